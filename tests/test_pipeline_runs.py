"""End-to-end ``bayesian-bits train`` runs on synthetic data (shape stand-ins; no accuracy is claimed from them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bayesian_bits import checkpoint_io
from bayesian_bits.cli import main
from bayesian_bits.pipeline import runner
from bayesian_bits.pipeline.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
MNIST_SMOKE = ["--experiment", "mnist", "--model", "lenet5quantized", "--synthetic", "32", "--batch-size", "8",
               "--optimizer", "Adam", "--learning-rate", "1e-3", "--learning-rate-q", "1e-3",
               "--learning-rate-s", "1e-3", "--gating-lambda", "0.1", "--reg-type", "bop", "--include-pruning",
               "--learned-scale", "range", "--n-workers", "0", "--eval-every", "1"]


def train(tmp_path: Path, *flags: str) -> int:
    return main(["train", "--data-dir", str(tmp_path / "data"), *flags])


def final_weights(logdir: Path) -> dict[str, torch.Tensor]:
    return checkpoint_io.load(logdir / "epoch_FINAL.pth", "x")["model"]


MODEL_RUNS = {
    "lenet5quantized": ["--experiment", "mnist", "--synthetic", "8"],
    "vggquantized": ["--experiment", "cifar10", "--synthetic", "4"],
    "resnet18": ["--experiment", "imagenet", "--synthetic", "4", "--synthetic-image-size", "16"],
    "mobilenetv2": ["--experiment", "imagenet", "--synthetic", "4", "--synthetic-image-size", "16"],
}


@pytest.mark.parametrize("model", list(MODEL_RUNS))
def test_every_model_trains_evaluates_and_finetunes(tmp_path: Path, model: str) -> None:
    logdir = tmp_path / "run"
    code = train(tmp_path, "--model", model, *MODEL_RUNS[model], "--batch-size", "4", "--epochs", "1",
                 "--max-batches", "1", "--optimizer", "Adam", "--learning-rate", "1e-3", "--learning-rate-q", "1e-3",
                 "--gating-lambda", "0.01", "--reg-type", "bop", "--include-pruning", "--learned-scale", "range",
                 "--fixed-gate-finetune-epochs", "1", "--n-workers", "0", "--logdir", str(logdir))
    assert code == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["synthetic"] and summary["model"] == model and 0 < summary["relative_bops"] <= 100
    assert {"weight_bits", "act_bits", "kept_out_pct"} <= set(summary["layers"][0])
    records = read_metrics(logdir)
    assert [(r["phase"], r["epoch"]) for r in records] == [("train", 1), ("finetune", 1)]
    assert all(r["top1"] is not None for r in records)
    for name in ("last.pth", "epoch_FINAL_PRE_FT.pth", "epoch_FINAL.pth", "bits_per_layer.png",
                 "training_curves.png", "log", "metrics.jsonl"):
        assert (logdir / name).is_file(), name
    # The fine-tuned model keeps its fixed bit widths and masks as state: --eval-only reproduces its accuracy.
    code = train(tmp_path, "--model", model, *MODEL_RUNS[model], "--batch-size", "4", "--n-workers", "0",
                 "--eval-only", "--checkpoint", str(logdir / "epoch_FINAL.pth"), "--include-pruning",
                 "--learned-scale", "range", "--logdir", str(tmp_path / "eval"))
    assert code == 0
    again = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert again["top1"] == summary["top1"] and again["relative_bops"] == summary["relative_bops"]


@pytest.mark.parametrize(
    "mode",
    [["--prune-only"], ["--prune-only", "--fixed-8bit"], ["--prune-only", "--fixed-48bit"], ["--fixed-8bit"],
     ["--no-act-quant"], ["--static-fold-bn", "--weight-decay", "1e-4", "--lr-schedule", "cosine:0"]],
    ids=lambda m: " ".join(m),
)
def test_modes_run(tmp_path: Path, mode: list[str]) -> None:
    assert train(tmp_path, *MNIST_SMOKE, *mode, "--epochs", "1", "--max-batches", "1",
                 "--fixed-gate-finetune-epochs", "1") == 0


def test_quantization_only_mode_has_no_pruning_gates(tmp_path: Path) -> None:
    flags = [f for f in MNIST_SMOKE if f != "--include-pruning"]
    logdir = tmp_path / "q"
    assert train(tmp_path, *flags, "--epochs", "1", "--max-batches", "1", "--logdir", str(logdir)) == 0
    assert not any("gamma_2" in k for k in final_weights(logdir))


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    """Make the ``calls``-th training epoch raise KeyboardInterrupt, as a Ctrl-C would."""
    real = runner.train_epoch
    count = {"n": 0}

    def flaky(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_epoch", flaky)


@pytest.mark.parametrize("interrupt_at", [2, 4], ids=["during-training", "during-finetuning"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt_at: int
) -> None:
    flags = [*MNIST_SMOKE, "--epochs", "2", "--fixed-gate-finetune-epochs", "2", "--seed", "7"]
    assert train(tmp_path, *flags, "--logdir", str(tmp_path / "straight")) == 0
    with monkeypatch.context() as patch:
        _interrupt_after(patch, interrupt_at)
        assert train(tmp_path, *flags, "--logdir", str(tmp_path / "cut")) == 130
    assert not (tmp_path / "cut" / "epoch_FINAL.pth").exists()
    assert train(tmp_path, *flags, "--logdir", str(tmp_path / "cut"), "--resume",
                 str(tmp_path / "cut" / "last.pth")) == 0
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "cut")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert [r["index"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3, 4]


def test_resume_with_other_structure_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    logdir = tmp_path / "a"
    assert train(tmp_path, *MNIST_SMOKE, "--epochs", "1", "--max-batches", "1", "--logdir", str(logdir)) == 0
    flags = [f for f in MNIST_SMOKE if f != "--include-pruning"]
    assert train(tmp_path, *flags, "--resume", str(logdir / "last.pth")) == 2
    assert "--include-pruning False (checkpoint: True)" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed next to the interpreter")
def test_two_process_gloo_ddp_run(tmp_path: Path) -> None:
    logdir = tmp_path / "ddp"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "bayesian_bits.train", *MNIST_SMOKE,
           "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--epochs", "2", "--batch-size", "16",
           "--fixed-gate-finetune-epochs", "1", "--logdir", str(logdir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["world_size"] == 2
    ckpt = checkpoint_io.load(logdir / "epoch_FINAL.pth", "x")
    assert len(ckpt["rng"]) == 2  # both processes' random streams are kept for --resume
    records = read_metrics(logdir)
    assert [r["images_per_s"] > 0 for r in records] == [True, True, True]
    assert sum(1 for line in (logdir / "log").read_text().splitlines() if line.startswith("Done in")) == 1


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed next to the interpreter")
def test_missing_data_under_ddp_stops_every_process(tmp_path: Path) -> None:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "bayesian_bits.train", "--experiment",
           "imagenet", "--model", "resnet18", "--data-dir", str(tmp_path), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("bayesian-bits train: error: ImageNet train split not usable") == 2
