"""Builders from the command line: ``timm:<name>`` with ``--model-args`` on the grayscale datasets read as RGB
(``--channels 3``), through ``train``, ``--resume``, ``--eval-only --checkpoint`` and ``export``, on real
Fashion-MNIST for a few batches; bad builder flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bayesian_bits.cli import main
from bayesian_bits.data import load_data
from bayesian_bits.experiments import EXPERIMENTS
from bayesian_bits.export import load_eval_model, load_pruned
from bayesian_bits.models import resolve_float_model
from tests.interrupt import interrupted_in_epoch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VIT = ["--model", "timm:vit_tiny_patch16_224", "--model-args", "img_size=28", "patch_size=4", "embed_dim=32",
       "depth=2", "num_heads=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the real MNIST and Fashion-MNIST files (the shared folder is read-only)."""
    root = tmp_path_factory.mktemp("data")
    for name in ("MNIST", "FashionMNIST"):
        if not (SHARED / name / "raw").is_dir():
            pytest.skip(f"real {name} files not at {SHARED}")
        shutil.copytree(SHARED / name / "raw", root / name / "raw")
        for path in (root / name / "raw").iterdir():
            path.chmod(0o644)
    return root


def _train(data_dir: Path, logdir: Path, *flags: str, status: int = 0) -> dict | None:
    code = main(["train", "--experiment", "fashion-mnist", "--data-dir", str(data_dir), "--epochs", "2",
                 "--batch-size", "16", "--max-batches", "2", "--n-workers", "0", "--seed", "0", "--learned-scale",
                 "range", "--include-pruning", "--reg-type", "bop", "--logdir", str(logdir), *flags])
    assert code == status
    return json.loads((logdir / "summary.json").read_text()) if status == 0 else None


def test_timm_vit_on_rgb_fashion_mnist_resumes_evaluates_and_exports(data_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm")
    run = tmp_path / "run"
    with interrupted_in_epoch(monkeypatch):
        _train(data_dir, run, *VIT, "--channels", "3", status=130)  # interrupted after epoch 1
    options = torch.load(run / "last.pth", weights_only=True)["options"]
    assert options["model_args"] == VIT[3:] and options["dataset"]["channels"] == 3
    assert options["dataset"]["mac_shape"] == [1, 3, 28, 28]

    summary = _train(data_dir, run, *VIT, "--channels", "3", "--resume", str(run / "last.pth"))
    assert summary["epochs"] == 2
    rows = {row["name"] for row in summary["layers"]}
    # both attention matmuls (q·kᵀ and P·v) of each block are quantized rows beside the linear layers
    assert {"blocks.0.attn.qkv", "blocks.0.attn.matmul", "blocks.0.attn.matmul_1", "blocks.1.mlp.fc2", "head"} <= rows

    ckpt = run / "epoch_FINAL.pth"
    assert main(["train", "--eval-only", "--checkpoint", str(ckpt), "--logdir", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["top1"] == summary["top1"]

    assert main(["export", str(ckpt), "--format", "pruned", "-o", str(tmp_path / "model.pt")]) == 0
    x = torch.rand(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "model.pt")(x), load_eval_model(ckpt).model(x))


def test_channels_3_reads_the_gray_datasets_as_rgb(data_dir: Path) -> None:
    gray, rgb = (load_data(EXPERIMENTS["mnist"], data_dir, channels=c) for c in (None, 3))
    assert rgb.info["channels"] == 3 and rgb.info["mac_shape"] == [1, 3, 28, 28]
    (x1, y1), (x3, y3) = gray.val[7], rgb.val[7]
    assert x1.shape == (1, 28, 28) and x3.shape == (3, 28, 28) and y1 == y3
    assert torch.equal(x3, x1.expand(3, -1, -1))  # the gray channel, repeated


@pytest.mark.parametrize(("flags", "message"), [
    (["--model", "torchvision:resnet18", "--channels", "3", "--experiment", "cifar10"], "--channels applies to"),
    (["--model", "timm:no_such_net"], "timm has no model 'no_such_net'"),
    (["--model", "timm:resnet18", "--model-args", "img_size"], "--model-args 'img_size': use KEY=VALUE"),
    (["--model", "timm:resnet18", "--model-args", "num_classes=3"], "num_classes in its builder arguments"),
    (["--model", "timm:resnet18", "--model-args", "img_size=28"], "its builder refused its arguments"),
    (["--model", "lenet5quantized", "--model-args", "depth=2"], "take no builder arguments"),
])
def test_bad_builder_flags_are_one_line_naming_the_way_out(flags: list[str], message: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("timm")
    argv = ["train", "--experiment", "fashion-mnist", "--data-dir", str(tmp_path), "--epochs", "1", "--synthetic",
            "8", "--n-workers", "0", "--logdir", str(tmp_path / "run"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_timm_builder_takes_channels_classes_and_model_args() -> None:
    pytest.importorskip("timm")
    vit = resolve_float_model("timm:vit_tiny_patch16_224", num_classes=7, in_channels=1,
                              model_args={"img_size": 28, "patch_size": 4, "depth": 1})
    assert vit(torch.rand(2, 1, 28, 28)).shape == (2, 7) and len(vit.blocks) == 1
    with pytest.raises(RuntimeError, match="could not load timm's pretrained resnet18 weights"):
        resolve_float_model("timm:resnet18", pretrained=True)  # no model hub from here


def test_float_model_trains_from_the_command_line(tmp_path: Path) -> None:
    """--no-weight-quant --no-act-quant: the baseline of the same command, with nothing to calibrate or regularise."""
    assert main(["train", "--experiment", "mnist", "--model", "lenet5quantized", "--synthetic", "32", "--data-dir",
                 str(tmp_path), "--epochs", "1", "--batch-size", "16", "--n-workers", "0", "--no-weight-quant",
                 "--no-act-quant", "--logdir", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {row["weight_bits"] for row in summary["layers"]} == {"float"}
    assert not any(k.endswith("x_max") for k in torch.load(tmp_path / "run" / "epoch_FINAL.pth",
                                                           weights_only=True)["model"])
