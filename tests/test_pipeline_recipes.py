"""The recipe script builds commands that the CLI accepts, with the reference README's settings."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from bayesian_bits.cli import build_parser
from bayesian_bits.pipeline.options import check_train_options

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "recipes" / "run.sh"


def recipe(name: str, *extra: str, **env: str) -> list[str]:
    proc = subprocess.run(["bash", str(RUN), name, "DATA", *extra], capture_output=True, text=True, check=True,
                          env={**os.environ, "PRINT": "1", **env}, timeout=60)
    return shlex.split(proc.stdout)


@pytest.mark.parametrize(("name", "lam", "epochs"), [("mnist", 0.1, 100), ("cifar10", 0.01, 300),
                                                      ("imagenet", 0.05, 30)])
def test_recipes_parse(name: str, lam: float, epochs: int) -> None:
    cmd = recipe(name)
    assert cmd[:3] == ["python", "-m", "bayesian_bits.train"]
    args = build_parser().parse_args(["train", *cmd[3:]])
    check_train_options(args)
    assert (args.experiment, args.gating_lambda, args.epochs, args.logdir) == (name, lam, epochs, f"runs/{name}")


def test_multi_gpu_recipe_uses_torchrun_and_passes_flags_through() -> None:
    cmd = recipe("cifar10", "runs/x", "--seed", "3", NPROC="4", MU="0.1")
    assert cmd[:6] == ["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "bayesian_bits.train"]
    args = build_parser().parse_args(["train", *cmd[6:]])
    assert (args.gating_lambda, args.logdir, args.seed) == (0.1, "runs/x", 3)


def test_imagefolder_recipe_trains_a_torchvision_model_on_your_images() -> None:
    cmd = recipe("imagefolder", "runs/mine", MODEL="torchvision:mobilenet_v3_large", SIZE="160")
    args = build_parser().parse_args(["train", *cmd[3:]])
    check_train_options(args)
    assert (args.experiment, args.model, args.image_size, args.pretrained) == (
        "imagefolder", "torchvision:mobilenet_v3_large", 160, True)
    assert (args.logdir, args.fixed_gate_finetune_epochs) == ("runs/mine", 5)
