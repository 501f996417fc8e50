"""The ``bayesian-bits`` command line: help, the reference README commands, and exit status 2 for bad calls."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bayesian_bits.cli import build_parser, main

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]

# The reference README's commands with only the program name changed (SPEC B §6.1, §9).
README = {
    "mnist": "--experiment mnist --data-dir D --model lenet5quantized --batch-size 128 --learning-rate 1e-3 "
    "--learning-rate-q 1e-3 --learning-rate-s 1e-3 --optimizer Adam --optimizer-q Adam --optimizer-s Adam "
    "--gating-lambda 0.1 --gamma-4-init 6 --gamma-8-init 6 --gamma-16-init -6 --gamma-32-init -6 "
    "--learned-scale range --epochs 100 --include-pruning --reg-type bop --logdir L",
    "cifar10": "--experiment cifar10 --data-dir D --model vggquantized --batch-size 128 --learning-rate 1e-3 "
    "--learning-rate-q 1e-3 --learning-rate-s 1e-3 --optimizer Adam --optimizer-q Adam --optimizer-s Adam "
    "--gating-lambda 0.01 --gamma-4-init 6 --gamma-8-init 6 --gamma-16-init 6 --gamma-32-init 6 "
    "--learned-scale range --epochs 300 --include-pruning --reg-type bop --logdir L",
    "imagenet": "--experiment imagenet --data-dir D --model resnet18 --batch-size 384 --learning-rate 3e-3 "
    "--learning-rate-q 1e-3 --learning-rate-s 1e-3 --optimizer SGD --optimizer-q Adam --optimizer-s Adam "
    "--gating-lambda 0.05 --gamma-4-init 6 --gamma-8-init 6 --gamma-16-init 6 --gamma-32-init -6 "
    "--learned-scale range --epochs 30 --lr-schedule multistep:10:20 --pretrained --checkpointing "
    "--include-pruning --reg-type bop --fixed-gate-finetune-epochs 10 --logdir L",
}


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return int(exc.code)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_console_script_help(argv: list[str]) -> None:
    proc = subprocess.run([str(BIN / "bayesian-bits"), *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: bayesian-bits")
    assert "--gating-lambda" in proc.stdout if "train" in argv else "train" in proc.stdout


def test_module_entry_point_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "bayesian_bits.train", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--fixed-gate-finetune-epochs" in proc.stdout


@pytest.mark.parametrize("experiment", list(README))
def test_reference_readme_commands_parse(experiment: str) -> None:
    from bayesian_bits.pipeline.options import check_train_options

    args = build_parser().parse_args(["train", *shlex.split(README[experiment])])
    check_train_options(args)
    assert args.experiment == experiment and args.include_pruning and args.reg_type == "bop"
    assert args.learned_scale == "range"
    if experiment == "imagenet":
        assert (args.optimizer, args.optimizer_q, args.batch_size) == ("SGD", "Adam", 384)
        assert args.pretrained and args.checkpointing and args.fixed_gate_finetune_epochs == 10
    else:
        assert args.gamma_16_init == (-6.0 if experiment == "mnist" else 6.0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--experiment", "svhn", "--model", "lenet5quantized"], "invalid choice: 'svhn'"),
        (["--experiment", "mnist", "--model", "alexnet"], "--model 'alexnet' is unknown"),
        (["--experiment", "mnist"], "train needs --model"),
        (["--experiment", "mnist", "--model", "torchvision:nonet", "--synthetic", "4"],
         "torchvision has no classification builder 'nonet'"),
        (["--experiment", "mnist", "--model", "no_such_pkg.mod:build", "--synthetic", "4"],
         "cannot import build from no_such_pkg.mod"),
        (["--experiment", "mnist", "--model", "lenet5quantized", "--override", "conv1:weight_bits=3"],
         "weight_bits='3'; use one of 2/4/8/16/32 or none"),
        (["--experiment", "mnist", "--model", "lenet5quantized", "--override", "conv1"], "PATTERN:KEY=VALUE"),
        (["--experiment", "mnist", "--model", "lenet5quantized", "--image-size", "32"], "imagefolder only"),
        (["--experiment", "imagefolder", "--model", "lenet5quantized", "--mean", "0.5"], "--mean and --std go"),
        (["--experiment", "imagefolder", "--model", "lenet5quantized"], "imagefolder: "),
        (["--experiment", "mnist", "--model", "tests.zoo:small_cnn", "--pretrained"], "--pretrained: tests.zoo"),
        (["--experiment", "mnist", "--model", "resnet18"], "--model resnet18 does not fit --experiment mnist"),
        (["--experiment", "mnist", "--model", "lenet5quantized", "--prune-only"], "--prune-only needs"),
        (["--experiment", "mnist", "--model", "lenet5quantized", "--fixed-8bit", "--fixed-48bit"], "exclusive"),
        (["--experiment", "mnist", "--model", "lenet5quantized", "--lr-schedule", "step:3"], "--lr-schedule"),
        (["--experiment", "mnist", "--model", "lenet5quantized", "--finetune-learning-rate", "0"],
         "--finetune-learning-rate must be a positive number, got 0.0"),
        (["--experiment", "mnist", "--model", "lenet5quantized", "--learning-rate-s", "nan"],
         "--learning-rate-s must be a positive number"),
        (["--experiment", "imagenet", "--model", "resnet18"], "ImageNet train split not usable"),
        (["--experiment", "mnist", "--model", "lenet5quantized", "--synthetic", "4", "--amp", "bf16",
          "--device", "cpu"], "--amp bf16 needs a CUDA device"),
        (["--experiment", "mnist", "--model", "lenet5quantized", "--synthetic", "4", "--resume", "nope.pth"],
         "--resume nope.pth: no such file"),
    ],
)
def test_bad_invocations_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    assert run_main(["train", "--data-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_missing_data_through_the_console_script(tmp_path: Path) -> None:
    proc = subprocess.run([str(BIN / "bayesian-bits"), "train", "--experiment", "imagenet", "--model", "resnet18",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "imagenet_raw" in proc.stderr
