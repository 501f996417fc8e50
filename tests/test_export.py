"""``bayesian-bits export``: manifest, pruned, packed and onnx formats of all four models with randomised gates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import bayesian_bits as bb
from bayesian_bits import bop_report, build_model, calibrate, checkpoint_io
from bayesian_bits.cli import build_parser, main
from bayesian_bits.errors import CheckpointError
from bayesian_bits.export import (
    export_model,
    load_eval_model,
    load_packed,
    load_pruned,
    manifest,
    onnx_model,
    pack,
    pruned_model,
    run_onnxruntime,
)
from bayesian_bits.export.graph import regions
from bayesian_bits.export.layer import ExportLayer
from bayesian_bits.export.onnx import MAX_POOLS, NCHWC_BLOCK, container, pool_before_quantizing, to_onnx
from bayesian_bits.export.packed import pack_bits, unpack_bits
from bayesian_bits.export.quant import QuantSpec, TensorQuant, spec_entry, spec_from_entry
from bayesian_bits.finetune import convert_to_fixed
from bayesian_bits.pipeline.errors import UsageError
from bayesian_bits.pipeline.runner import quant_config
from bayesian_bits.quantizer import FixedQuantizer, Mode
from tests import zoo
from tests.checks import ZOO_CONFIG

onnx = pytest.importorskip("onnx")

EXPERIMENT = {"lenet5quantized": "mnist", "vggquantized": "cifar10", "resnet18": "imagenet", "mobilenetv2": "imagenet"}
SIDE = 32  # synthetic ImageNet side: small, so the CPU tests stay quick
# gamma_4 … gamma_32 giving eval bit widths 2, 4, 8, 16 and 32; quantizers cycle through them.
BIT_PATTERNS = [(-6, -6, -6, -6), (6, -6, -6, -6), (6, 6, -6, -6), (6, 6, 6, -6), (6, 6, 6, 6)]


def write_checkpoint(model_name: str, path: Path, seed: int = 0, flags: tuple[str, ...] = ()) -> Path:
    """A checkpoint as training writes it (with extra train ``flags``): every bit width from 2 to 32 among the
    quantizers, random pruning gates (about 30 % of channels pruned), and random biases and BN statistics, so
    pruned channels emit constants."""
    exp = EXPERIMENT[model_name]
    argv = ["train", "--experiment", exp, "--model", model_name, "--data-dir", "D", "--include-pruning", *flags]
    if exp == "imagenet":
        argv += ["--synthetic", "4", "--synthetic-image-size", str(SIDE)]
    args = build_parser().parse_args(argv)
    torch.manual_seed(seed)
    model = build_model(args.model, quant_config(args))
    side = {"mnist": 28, "cifar10": 32}.get(exp, SIDE)
    calibrate(model, torch.rand(2, 1 if exp == "mnist" else 3, side, side))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        quantizers = [m for m in model.modules() if hasattr(m, "gamma_4")]
        for i, q in enumerate(quantizers):
            for bits, gamma in zip((4, 8, 16, 32), BIT_PATTERNS[i % len(BIT_PATTERNS)], strict=True):
                getattr(q, f"gamma_{bits}").fill_(gamma)
            if q.gamma_2 is not None:
                q.gamma_2.copy_(torch.randn(q.gamma_2.shape, generator=gen) * 2 + 1)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    checkpoint_io.save({"phase": "train", "model": model.state_dict(), "options": vars(args)}, path)
    return path


@pytest.fixture(scope="module", params=list(EXPERIMENT))
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(request.param, tmp_path_factory.mktemp("export") / f"{request.param}.pth")


@pytest.fixture(scope="module")
def lenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint("lenet5quantized", tmp_path_factory.mktemp("export") / "lenet.pth")


def batch(loaded, n: int = 8) -> torch.Tensor:
    return torch.randn(n, *loaded.input_shape[1:], generator=torch.Generator().manual_seed(3))


def assert_matches(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float rounding, allowing the rare activation that lands one grid step apart (a rounding tie
    decided differently after a last-bit difference, which the layers after it carry on into the logits; at 4-bit
    weights through ResNet-18 a single flipped activation moves a sample's logits by up to 12 %): the median logit
    agrees to fp32 precision and the predictions agree on all but at most one sample in eight."""
    diff, scale = (got - ref).abs(), float(ref.abs().max())
    assert float(diff.median()) <= 1e-5 * scale
    disagree = int((got.argmax(1) != ref.argmax(1)).sum())
    assert disagree <= max(1, len(got) // 8), f"{disagree} of {len(got)} predictions differ"


def test_manifest_matches_bop_report(ckpt: Path, tmp_path: Path) -> None:
    loaded = load_eval_model(ckpt)
    report = bop_report(loaded.model)
    assert main(["export", str(ckpt), "--format", "manifest", "-o", str(tmp_path / "m.json")]) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert data == json.loads(json.dumps(manifest(loaded)))
    assert data["relative_bops"] == pytest.approx(report["relative_bops"], rel=1e-12)
    assert sum(layer["bops"] for layer in data["layers"]) == pytest.approx(data["bops"], rel=1e-9)
    removed = {layer["name"] for layer in data["layers"] if layer["channels_removed_on_export"]}
    assert removed == set(regions(loaded.model).by_output) & {layer["name"] for layer in data["layers"]}
    tensors = [layer[k] for layer in data["layers"] for k in ("weight", "act") if layer[k]]
    assert {t["bits"] for t in tensors} == {2, 4, 8, 16, 32}
    for layer in data["layers"]:
        w = layer["weight"]
        if w["bits"] < 32:
            c = {2: 1, 4: 5, 8: 85, 16: 21845}[w["bits"]]
            span = 2 * w["x_max"] if w["signed"] else w["x_max"]
            assert w["scale"] == pytest.approx(span / 3 / c, rel=1e-6)
        mask = loaded.model.get_submodule(layer["name"]).weight_quantizer.keep_mask()
        if mask is not None:
            assert w["kept_channels"] == torch.nonzero(mask).flatten().tolist()


def test_pruned_equals_masked_eval_model(ckpt: Path, tmp_path: Path) -> None:
    loaded = load_eval_model(ckpt)
    out = tmp_path / "p.pt"
    assert main(["export", str(ckpt), "--format", "pruned", "-o", str(out)]) == 0
    pruned = load_pruned(out)
    found = regions(loaded.model)
    assert found.by_output, "no layer had removable channels"
    for name, region in found.by_output.items():
        op = pruned.get_submodule(name).op
        assert (op.out_channels if isinstance(op, torch.nn.Conv2d) else op.out_features) == region.kept.numel()
        assert region.kept.numel() < region.channels
    for name in found.order:  # layers whose pruned channels could not go keep them all, zero rows included
        mask = loaded.model.get_submodule(name).weight_quantizer.keep_mask()
        if name not in found.by_output and mask is not None:
            assert pruned.get_submodule(name).op.weight.shape[0] == mask.numel()
    x = batch(loaded)
    with torch.no_grad():
        ref = loaded.model(x)
        torch.testing.assert_close(pruned(x), ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
        # The carried constants matter: without them the outputs differ.
        for name, region in found.by_input.items():
            if name in region.sinks:
                layer = pruned.get_submodule(name)
                layer.op.bias.zero_()
                layer.bias_map = None
        assert not torch.allclose(pruned(x), ref, atol=1e-3)


def test_residual_coupling(tmp_path: Path) -> None:
    """ResNet-18: each block's first conv loses its pruned channels; the stem, second convs and downsamples feed
    residual adds and keep theirs. MobileNetV2: removal reaches through depthwise convs."""
    resnet = load_eval_model(write_checkpoint("resnet18", tmp_path / "r.pth"))
    found = regions(resnet.model)
    assert sorted(found.by_output) == sorted(f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2))
    assert all(r.sinks == [r.producer.replace("conv1", "conv2")] for r in found.by_output.values())
    mobile = load_eval_model(write_checkpoint("mobilenetv2", tmp_path / "m.pth"))
    found = regions(mobile.model)
    assert found.by_output["features.1.conv.0.0"].producer == "features.0.0"
    assert found.by_input["features.2.conv.2"].passthrough == ["features.2.conv.1.0"]
    assert "features.3.conv.2" not in found.by_output  # its output feeds the residual add


def test_onnx_fills_channel_blocks(tmp_path: Path) -> None:
    """The ONNX export keeps each region's first pruned channels up to a multiple of onnxruntime's NCHWc block (so
    that its blocked convolutions run), every channel left pruned by the gates included; the kept pruned channels
    emit their constants as in the eval model."""
    loaded = load_eval_model(write_checkpoint("mobilenetv2", tmp_path / "m.pth"))
    exact, filled = regions(loaded.model), regions(loaded.model, NCHWC_BLOCK)
    assert exact.by_output
    for name, region in exact.by_output.items():
        kept = filled.by_output[name].kept if name in filled.by_output else torch.arange(region.channels)
        assert set(region.kept.tolist()) <= set(kept.tolist())
        assert kept.numel() % NCHWC_BLOCK == 0 or kept.numel() == region.channels
        assert kept.numel() - region.kept.numel() < NCHWC_BLOCK
        assert torch.equal(kept, kept.sort().values)
    pruned, proto = onnx_model(loaded)
    widths = {t.name: t.dims[0] for t in proto.graph.initializer if t.dims}
    original = {m.out_channels for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d)}
    convs = [widths[n.input[1]] for n in proto.graph.node if n.op_type == "Conv"]
    assert convs and all(w % NCHWC_BLOCK == 0 or w in original for w in convs)
    x = batch(loaded)
    with torch.no_grad():
        ref = loaded.model(x)
        torch.testing.assert_close(pruned(x), ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)


def test_onnx_pools_before_quantizing(lenet: Path) -> None:
    """The ONNX export moves each max pooling that reads a quantizer's output ahead of the quantizer (which then reads
    a quarter of the values) without changing a value."""
    loaded = load_eval_model(lenet)
    pruned = pruned_model(loaded, NCHWC_BLOCK)
    x = loaded.example(2)
    program = torch.export.export(pruned, (x,), strict=False)
    assert pool_before_quantizing(program.graph_module) == 2
    pools = [n for n in program.graph.nodes if n.target in MAX_POOLS]
    assert len(pools) == 2
    for pool in pools:
        assert pool.args[0].target is not torch.ops.bbkernels.qdq.default
        assert [user.target for user in pool.users] == [torch.ops.bbkernels.qdq.default]
    with torch.no_grad():
        assert torch.equal(program.module()(x), pruned(x))


def test_packed_round_trip(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load_eval_model(ckpt)
    out = tmp_path / "w.packed"
    assert main(["export", str(ckpt), "--format", "packed", "-o", str(out)]) == 0
    assert "bytes" in capsys.readouterr().out
    assert out.stat().st_size < ckpt.stat().st_size
    data = torch.load(out, weights_only=True)
    packed = [layer for layer in data["layers"] if layer["codes"] is not None]
    assert {2, 4, 8} <= {layer["weight_quant"]["bits"] for layer in packed}
    for layer in packed:  # dense: ceil(n·b/8) bytes
        assert layer["codes"].dtype == torch.uint8
        assert layer["codes"].numel() == -(-int(np.prod(layer["shape"])) * layer["weight_quant"]["bits"] // 8)
    x = batch(loaded)
    with torch.no_grad():
        restored = load_packed(out)(x)
        assert torch.equal(restored, pruned_model(loaded)(x))
    assert pack(loaded)["layers"][0]["shape"] == list(data["layers"][0]["shape"])


def test_onnx_matches_pytorch(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``export --format onnx``: one QuantizeLinear per quantized activation, its zero point placing the exact code
    range in the narrowest container, and a plain ``onnxruntime.InferenceSession(path)`` computes the eval model."""
    onnxruntime = pytest.importorskip("onnxruntime")
    loaded = load_eval_model(ckpt)
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "-o", str(out)]) == 0
    assert "default session" in capsys.readouterr().out
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    pruned = pruned_model(loaded)
    grids = [m.grid for m in pruned.modules() if isinstance(m, TensorQuant) and m.grid and m.grid.bits < 32]
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer} | {
        n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"}
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    float_form = [n for n in proto.graph.node if n.op_type == "Round"]
    assert len(quantize) + len(float_form) == len(grids) and quantize
    by_scale = {np.float32(g.scale): g for g in grids}
    for node in quantize:
        scale, zero_point = constants[node.input[1]], constants[node.input[2]]
        assert zero_point.size > 1 and len(set(zero_point.tolist())) == len(set(scale.tolist())) == 1  # per-axis
        assert container(by_scale[scale.flat[0]].codes) == (zero_point.dtype.name.upper(), int(zero_point.flat[0]))
    x = batch(loaded, 16)
    with torch.no_grad():
        ref = loaded.model(x)
    got = torch.from_numpy(onnxruntime.InferenceSession(str(out)).run(None, {"input": x.numpy()})[0])
    assert_matches(got, ref)


def test_fine_tuned_checkpoint(tmp_path: Path) -> None:
    """A fixed-gate fine-tuning checkpoint (fixed quantizers, masks as buffers, BN folded statically) exports too."""
    path = write_checkpoint("mobilenetv2", tmp_path / "gated.pth")
    gated = checkpoint_io.load(path, "gated")
    fixed = convert_to_fixed(load_eval_model(path).model)
    tuned = tmp_path / "ft.pth"
    checkpoint_io.save({"phase": "finetune", "pre_ft_model": gated["model"], "model": fixed.state_dict(),
                        "options": gated["options"]}, tuned)
    loaded = load_eval_model(tuned)
    assert any(isinstance(m, FixedQuantizer) for m in loaded.model.modules())
    assert regions(loaded.model).by_output
    x = batch(loaded)
    pruned, proto = onnx_model(loaded)
    with torch.no_grad():
        ref = loaded.model(x)
        torch.testing.assert_close(pruned(x), ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
    assert_matches(run_onnxruntime(proto, x), ref)


@pytest.mark.parametrize("flags", [("--prune-only",), ("--prune-only", "--fixed-48bit"), ("--fixed-8bit",)])
@pytest.mark.parametrize("model_name", ["lenet5quantized", "resnet18"])
def test_quantization_modes(model_name: str, flags: tuple[str, ...], tmp_path: Path) -> None:
    """Prune-only (float weights), fixed-bit with pruning, and fixed-bit without prune-only, whose forward ignores
    the pruning gates (SPEC B §1.11): the exports follow the forward, so nothing is removed there."""
    loaded = load_eval_model(write_checkpoint(model_name, tmp_path / "c.pth", flags=flags))
    removed = regions(loaded.model).by_output
    weights = [layer["weight"] for layer in manifest(loaded)["layers"]]
    if "--prune-only" in flags:
        assert removed and all(w["pruning_applied"] for w in weights if w["kept_channels"] is not None)
    else:
        assert not removed and not any(w["pruning_applied"] for w in weights)
    x = batch(loaded)
    pruned = pruned_model(loaded)
    with torch.no_grad():
        ref = loaded.model(x)
        assert_matches(pruned(x), ref)
        checkpoint_io.save(pack(loaded), tmp_path / "p.packed")
        assert torch.equal(load_packed(tmp_path / "p.packed")(x), pruned(x))
    if model_name == "lenet5quantized":  # float weights behind quantized inputs (prune-only) in ONNX: one model will do
        _, proto = onnx_model(loaded)
        assert_matches(run_onnxruntime(proto, x), ref)


def test_signed_extremes_past_the_grid_stay_exact() -> None:
    """At x_max = 0.6 the fp32 step of a fixed 8-bit signed quantizer rounds ±x_max' to codes ±128, one past ±127:
    the container's zero point shifts to hold a range that reaches one extreme, and onnxruntime reproduces the
    PyTorch values exactly, extremes included."""
    spec = QuantSpec("fixed", 8, True, 0.6)
    assert spec.grid.codes == (-128, 128)
    assert container((-127, 128)) == ("UINT16", 127)  # stored code = code + zero point, within 0…65535
    assert container((-128, 127)) == ("UINT16", 128) and container((-32768, 32767)) == ("UINT16", 32768)
    assert container((0, 65535)) == ("UINT16", 0) and container((-1, 65534)) == ("UINT16", 1)
    with pytest.raises(ValueError, match="16 bits"):
        container((-32768, 32768))
    # Files store the mode as its string; a float spec has no bit width (older files wrote 32 there).
    assert spec_from_entry(spec_entry(spec)) == spec and spec_entry(spec)["kind"] == "fixed"
    assert spec_from_entry({"kind": "float", "bits": 32, "signed": False, "x_max": 1.0}) == \
        QuantSpec(Mode.FLOAT, None, False, 1.0)
    linear = torch.nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.copy_(TensorQuant(spec)(torch.tensor([[0.7, 0.1, -0.3, 0.0]] * 3)))  # +0.6 → code 128
    model = torch.nn.Sequential(ExportLayer(linear, None, None, spec, spec), TensorQuant(spec)).eval()
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.3, -0.2, 0.1, 0.05]]) * 9
    proto = to_onnx(model, x, "extremes")
    with torch.no_grad():
        expected = model(x)
    assert {float(v) for v in expected.flatten()} >= {-128 * spec.scale, 128 * spec.scale}
    assert torch.equal(run_onnxruntime(proto, x), expected)


def test_image_size_override(tmp_path: Path) -> None:
    # A model and input without a rounding tie: the eval model sums residual levels, the pruned one carries removed
    # channels in its bias, and at a tie the two round one activation a grid step apart (BENCHMARKS.md, prepare zoo).
    ckpt = write_checkpoint("resnet18", tmp_path / "r.pth", seed=2)
    loaded = load_eval_model(ckpt, image_size=48)
    pruned = pruned_model(loaded)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), loaded.model(x), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="--image-size"):
            pruned(torch.randn(2, 3, 32, 32))
    with pytest.raises(UsageError, match="28×28"):
        load_eval_model(write_checkpoint("lenet5quantized", tmp_path / "l.pth"), image_size=32)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_bit_packing_round_trip(bits: int) -> None:
    values = np.random.default_rng(bits).integers(0, 2**bits, size=37)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-37 * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, 37), values)


def test_bad_inputs(lenet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "missing.pth"), "--format", "manifest", "-o", str(tmp_path / "m")]) == 2
    assert "no such file" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pth"
    checkpoint_io.save({"state_dict": {}}, foreign)
    assert main(["export", str(foreign), "--format", "onnx", "-o", str(tmp_path / "m")]) == 2
    assert "not a bayesian-bits train checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", str(lenet), "--format", "tflite", "-o", str(tmp_path / "m")])
    assert exc.value.code == 2
    assert main(["export", str(lenet), "--format", "pruned", "-o", str(tmp_path / "no" / "dir" / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(lenet), "--format", "onnx", "-o", str(tmp_path / "m"), "--image-size", "0"]) == 2
    assert "--image-size" in capsys.readouterr().err
    with pytest.raises(UsageError, match="packed"):
        load_packed(foreign)


def test_pruned_files_carry_the_models_other_tensors_and_fit_only_its_model(tmp_path: Path) -> None:
    """Norm weights and position embeddings are trained like the layers: the pruned and packed files carry them;
    loaded into another model, a file is one CheckpointError."""
    float_model = zoo.TinyTransformer().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = bb.prepare(float_model, x[:1], ZOO_CONFIG)
    bb.calibrate(model, x)
    with torch.no_grad():  # as if trained away from the float model's values
        model.get_parameter("norm.weight").mul_(3)
        model.get_parameter("pos").add_(0.5)
        ref = model.eval()(x)
    for fmt, load in (("pruned", load_pruned), ("packed", load_packed)):
        export_model(model, fmt, tmp_path / f"m.{fmt}")
        with torch.no_grad():
            assert torch.equal(load(tmp_path / f"m.{fmt}", skeleton=bb.prepare(float_model, x[:1], ZOO_CONFIG))(x),
                               ref)
    other = bb.prepare(zoo.MLP().eval(), x[:1], ZOO_CONFIG)
    with pytest.raises(CheckpointError, match="load it into the model it was exported from"):
        load_pruned(tmp_path / "m.pruned", skeleton=other)
