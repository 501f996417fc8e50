"""A user's model on a user's images from the command line: MNIST digits written as PNG class folders, trained with
``--experiment imagefolder`` and a torchvision model or a ``module:factory`` CNN for a few batches; the checkpoint
rebuilds itself for ``export`` (ONNX under onnxruntime predicts as PyTorch does) and for ``--eval-only``."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bayesian_bits import data
from bayesian_bits.cli import main
from bayesian_bits.data import load_data
from bayesian_bits.experiments import EXPERIMENTS
from bayesian_bits.export import load_eval_model, onnxruntime_session
from tests.interrupt import interrupted_in_epoch
from tests.zoo import small_cnn_for

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PER_CLASS = {"train": 4, "val": 2}


def _idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=offset)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR/{train,val}/<digit>/*.png: a few real MNIST test digits per class, grayscale PNGs."""
    raw = SHARED / "MNIST" / "raw"
    if not raw.is_dir():
        pytest.skip(f"real MNIST files not at {raw}")
    images = _idx(raw / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _idx(raw / "t10k-labels-idx1-ubyte.gz", 8)
    root = tmp_path_factory.mktemp("digits")
    for digit in range(10):
        picks = iter(np.flatnonzero(labels == digit))
        for split, count in PER_CLASS.items():
            folder = root / split / str(digit)
            folder.mkdir(parents=True)
            for k in range(count):
                Image.fromarray(images[next(picks)], mode="L").save(folder / f"{k}.png")
    return root


def _train(digits: Path, logdir: Path, *flags: str, status: int = 0) -> dict | None:
    code = main(["train", "--experiment", "imagefolder", "--data-dir", str(digits), "--image-size", "32",
                 "--epochs", "1", "--batch-size", "8", "--max-batches", "2", "--n-workers", "0", "--seed", "0",
                 "--learned-scale", "range", "--include-pruning", "--logdir", str(logdir), *flags])
    assert code == status
    return json.loads((logdir / "summary.json").read_text()) if status == 0 else None


@torch.no_grad()
def _onnx_predicts_as_pytorch(ckpt: Path, digits: Path, out: Path) -> None:
    # the user's own model code (tests.zoo): the checkpoint names it, the user confirms it
    assert main(["export", str(ckpt), "--format", "onnx", "-o", str(out), "--trust-model-code"]) == 0
    loaded = load_eval_model(ckpt, trust_model_code=True)
    info = loaded.options["dataset"]
    _, val, _ = load_data(EXPERIMENTS["imagefolder"], digits, image_size=info["image_size"],
                          channels=info["channels"], norm=(info["mean"], info["std"]))
    x = torch.stack([val[i][0] for i in range(len(val))])
    ref = loaded.model(x)
    got = torch.from_numpy(onnxruntime_session(out).run(None, {"input": x.numpy()})[0])
    assert got.shape == ref.shape == (10 * PER_CLASS["val"], 10)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_torchvision_model_on_an_image_folder_exports_and_evaluates_alone(digits: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    summary = _train(digits, tmp_path / "run", "--model", "torchvision:mobilenet_v3_small", "--num-classes", "10",
                     "--channels", "3")
    ckpt = tmp_path / "run" / "epoch_FINAL.pth"
    options = torch.load(ckpt, weights_only=True)["options"]
    assert options["dataset"]["channels"] == 3 and options["dataset"]["num_classes"] == 10
    assert len(options["dataset"]["mean"]) == 3  # computed on the training images, stored
    _onnx_predicts_as_pytorch(ckpt, digits, tmp_path / "model.onnx")
    # --eval-only with only --checkpoint rebuilds model and data from the checkpoint and reproduces its top-1
    assert main(["train", "--eval-only", "--checkpoint", str(ckpt), "--logdir", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["top1"] == summary["top1"]


@pytest.mark.slow
def test_own_factory_with_weights_and_override(digits: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    float_model = small_cnn_for(num_classes=10, in_channels=1)
    torch.save(float_model.state_dict(), tmp_path / "float.pt")
    summary = _train(digits, tmp_path / "run", "--model", "tests.zoo:small_cnn_for", "--weights",
                     str(tmp_path / "float.pt"), "--override", "1.head:weight_bits=8")
    layers = {row["name"]: row for row in summary["layers"]}
    assert layers["1.head"]["weight_bits"] == 8 and layers["1.stem"]["weight_bits"] != 8
    ckpt = tmp_path / "run" / "epoch_FINAL.pth"
    assert torch.load(ckpt, weights_only=True)["options"]["dataset"]["channels"] == 1  # grayscale from the files
    _onnx_predicts_as_pytorch(ckpt, digits, tmp_path / "model.onnx")


def test_eval_only_names_every_conflicting_flag(digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--experiment", "imagefolder", "--data-dir", str(digits), "--model", "lenet5quantized",
                 "--image-size", "28", "--epochs", "0", "--logdir", str(tmp_path / "run"), "--n-workers", "0",
                 "--skip", "classifier.1"])
    assert code == 0
    state = torch.load(tmp_path / "run" / "epoch_FINAL.pth", weights_only=True)["model"]
    gated = {k.rsplit(".", 2)[0] for k in state if k.endswith("quantizer.x_max")}
    assert any(k.startswith("classifier.0") for k in gated) and not any(k.startswith("classifier.1") for k in gated)
    capsys.readouterr()
    ckpt = str(tmp_path / "run" / "epoch_FINAL.pth")
    assert main(["train", "--eval-only", "--checkpoint", ckpt, "--model", "vggquantized", "--include-pruning",
                 "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for flag in ("--model 'vggquantized'", "--include-pruning True", "--image-size 32"):
        assert flag in err, err
    # run settings may differ; the stored --skip rebuilds the same model
    assert main(["train", "--eval-only", "--checkpoint", ckpt, "--batch-size", "7"]) == 0


def test_resume_rebuilds_the_model_and_reuses_the_stored_normalisation(
        digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flags = ["--model", "tests.zoo:small_cnn_for", "--epochs", "2"]
    with interrupted_in_epoch(monkeypatch):
        _train(digits, tmp_path / "run", *flags, status=130)  # interrupted after epoch 1
    stored = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["options"]["dataset"]
    monkeypatch.setattr(data, "channel_stats", lambda *a, **k: pytest.fail("mean/std recomputed on resume"))
    summary = _train(digits, tmp_path / "run", *flags, "--resume", str(tmp_path / "run" / "last.pth"))
    assert summary["epochs"] == 2
    assert torch.load(tmp_path / "run" / "epoch_FINAL.pth", weights_only=True)["options"]["dataset"] == stored
