"""``bayesian-bits export``: manifest, pruned and packed formats of a LeNet5 with randomised gates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesian_bits import bop_report, build_model, calibrate
from bayesian_bits.cli import build_parser, main
from bayesian_bits.export import load_eval_model, load_packed, manifest, pack, pruned_model
from bayesian_bits.export.packed import pack_bits, unpack_bits
from bayesian_bits.export.pruned import check_sequential
from bayesian_bits.pipeline.errors import UsageError
from bayesian_bits.pipeline.runner import quant_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeNet5 checkpoint as training writes it, with random gate logits: some channels pruned, mixed bits, and
    a positive bias on pruned channels so they emit a constant the export must carry forward."""
    args = build_parser().parse_args(["train", "--experiment", "mnist", "--model", "lenet5quantized", "--data-dir",
                                      "D", "--include-pruning", "--gamma-16-init", "-6", "--gamma-32-init", "-6"])
    torch.manual_seed(0)
    model = build_model(args.model, quant_config(args))
    calibrate(model, torch.rand(2, 1, 28, 28))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma_2" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2 + 1)
            elif "gamma_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 3)
        for layer in (model.features[0], model.features[2], model.classifier[0]):
            pruned = layer.weight_quantizer.keep_mask() == 0
            assert pruned.any()
            layer.bias[pruned] = 0.5
    path = tmp_path_factory.mktemp("export") / "epoch_FINAL.pth"
    torch.save({"phase": "train", "model": model.state_dict(), "options": vars(args)}, path)
    return path


def test_manifest_matches_bop_report(ckpt: Path, tmp_path: Path) -> None:
    loaded = load_eval_model(ckpt)
    report = bop_report(loaded.model, loaded.input_shape)
    assert main(["export", str(ckpt), "--format", "manifest", "-o", str(tmp_path / "m.json")]) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert data == json.loads(json.dumps(manifest(loaded)))
    assert data["relative_bops"] == pytest.approx(report["relative_bops"], rel=1e-12)
    assert sum(layer["bops"] for layer in data["layers"]) == pytest.approx(data["bops"], rel=1e-9)
    bits = {layer["weight"]["bits"] for layer in data["layers"]}
    assert len(bits) > 1
    for layer in data["layers"]:
        q = loaded.model.get_submodule(layer["name"]).weight_quantizer
        w = layer["weight"]
        c = {2: 1, 4: 5, 8: 85, 16: 21845}[w["bits"]]
        assert w["scale"] == pytest.approx(2 * w["x_max"] / 3 / c, rel=1e-6)
        mask = q.keep_mask()
        if mask is not None:
            assert w["kept_channels"] == torch.nonzero(mask).flatten().tolist()


def test_pruned_equals_masked_eval_model(ckpt: Path, tmp_path: Path) -> None:
    loaded = load_eval_model(ckpt)
    out = tmp_path / "p.pt"
    assert main(["export", str(ckpt), "--format", "pruned", "-o", str(out)]) == 0
    pruned = torch.load(out, weights_only=False)
    first = pruned.features[0].op
    kept = int(loaded.model.features[0].weight_quantizer.keep_mask().sum())
    assert first.out_channels == kept < 32 and pruned.features[2].op.in_channels == kept
    assert pruned.classifier[0].op.in_features < 64 * 16
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        ref = loaded.model(x)
        torch.testing.assert_close(pruned(x), ref, atol=1e-5, rtol=1e-5)
        # The carried constants matter: without them the outputs differ.
        for layer in (pruned.features[2], pruned.classifier[0], pruned.classifier[1]):
            layer.op.bias.zero_()
        assert not torch.allclose(pruned(x), ref, atol=1e-3)


def test_packed_round_trip(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load_eval_model(ckpt)
    out = tmp_path / "w.packed"
    assert main(["export", str(ckpt), "--format", "packed", "-o", str(out)]) == 0
    assert "bytes" in capsys.readouterr().out
    assert out.stat().st_size < ckpt.stat().st_size / 4
    data = torch.load(out, weights_only=True)
    assert all(layer["codes"] is not None and layer["codes"].dtype == torch.uint8 for layer in data["layers"])
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        restored = load_packed(out)(x)
        assert torch.equal(restored, pruned_model(loaded)(x))
        torch.testing.assert_close(restored, loaded.model(x), atol=1e-5, rtol=1e-5)
    assert pack(loaded)["layers"][0]["shape"] == list(data["layers"][0]["shape"])


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_bit_packing_round_trip(bits: int) -> None:
    values = np.random.default_rng(bits).integers(0, 2**bits, size=37)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-37 * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, 37), values)


def test_bad_inputs(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "missing.pth"), "--format", "manifest", "-o", str(tmp_path / "m")]) == 2
    assert "no such file" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    assert main(["export", str(foreign), "--format", "packed", "-o", str(tmp_path / "m")]) == 2
    assert "not a bayesian-bits train checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", str(ckpt), "--format", "tflite", "-o", str(tmp_path / "m")])
    assert exc.value.code == 2
    assert main(["export", str(ckpt), "--format", "pruned", "-o", str(tmp_path / "no" / "dir" / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(UsageError, match="resnet18"):
        check_sequential("resnet18")
    with pytest.raises(UsageError, match="packed"):
        load_packed(foreign)
