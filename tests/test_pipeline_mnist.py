"""A short training on real MNIST with the README's settings reaches > 90 % top-1 on the 10k test set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bayesian_bits.cli import main

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST files not at {SHARED_MNIST}")
def test_short_mnist_training_learns(tmp_path: Path) -> None:
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in SHARED_MNIST.glob("*.gz"):
        shutil.copy(gz, raw / gz.name)
    logdir = tmp_path / "run"
    code = main(["train", "--experiment", "mnist", "--data-dir", str(tmp_path / "data"), "--model", "lenet5quantized",
                 "--batch-size", "64", "--learning-rate", "1e-3", "--learning-rate-q", "1e-3",
                 "--learning-rate-s", "1e-3", "--optimizer", "Adam", "--optimizer-q", "Adam", "--optimizer-s", "Adam",
                 "--gating-lambda", "0.1", "--gamma-4-init", "6", "--gamma-8-init", "6", "--gamma-16-init", "-6",
                 "--gamma-32-init", "-6", "--learned-scale", "range", "--epochs", "1", "--include-pruning",
                 "--reg-type", "bop", "--max-batches", "100", "--n-workers", "0", "--logdir", str(logdir)])
    assert code == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert not summary["synthetic"]
    assert summary["top1"] > 90.0
    assert summary["relative_bops"] <= 6.25 + 1e-9  # gamma_16 = -6: at most W8A8 from the start
