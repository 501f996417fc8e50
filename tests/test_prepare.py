"""`bayesian_bits.prepare`: the placement rules on small graphs, options, errors, and a zoo of real models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayesian_bits as bb
from bayesian_bits.layers import QuantConv1d, QuantConv2d, QuantLayer, QuantLinear
from bayesian_bits.quantizer import BayesianBitsQuantizer
from tests import prepare_pins, zoo
from tests.checks import ZOO_CONFIG, assert_agrees, assert_onnx_deploys, flop_counter_macs, randomize_gates

CONFIG = bb.QuantConfig(include_pruning=True, reg_type="bop")


def quantizer_names(model: nn.Module) -> list[str]:
    return [n for n, _ in bb.quantizers(model)]


class Residual(nn.Module):
    """conv → BN → ReLU, a second conv + BN into an add with the block input, ReLU, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(self.relu(x + y), 1).flatten(1))


def test_placement_rule_on_a_residual_block():
    model = bb.prepare(Residual(), torch.rand(2, 3, 8, 8), CONFIG)
    # Every layer output but the logits; the stem has no activation (feeds the add and conv1); the add's ReLU
    # output is quantized once, before the pooling.
    assert quantizer_names(model) == [
        "stem.weight_quantizer", "stem.act_quantizer", "conv1.weight_quantizer", "conv1.act_quantizer",
        "conv2.weight_quantizer", "conv2.act_quantizer", "fc.weight_quantizer", "act_quantizer"]
    conv1, conv2, fc = (model.get_submodule(n) for n in ("conv1", "conv2", "fc"))
    assert isinstance(conv1.bn, nn.BatchNorm2d) and isinstance(conv1.activation, nn.ReLU)
    assert not conv1.activation.inplace  # attached copies never work in place
    assert conv2.bn is not None and conv2.activation is None
    assert fc.act_quantizer is None and fc.weight_quantizer.gamma_2 is None  # the logits layer
    flow = model.bb_dataflow
    assert flow.logits == ("fc",)
    terms = {t.name: t for t in flow.terms}
    assert terms["stem"].inputs[0].quantizer is None and terms["stem"].inputs[0].bits == 8  # network input
    assert terms["fc"].inputs[0].quantizer == "act_quantizer"
    assert terms["conv2"].inputs[0].mask_from == "conv1"  # conv1's pruned channels go (a region)
    assert terms["conv1"].inputs[0].mask_from is None  # the stem also feeds the add: its channels stay
    assert set(flow.regions) == {"conv1"}
    bb.calibrate(model, torch.rand(4, 3, 8, 8))
    bb.assign_macs(model)
    # conv2's output only feeds the add: quantized (signed), in no group, not in BOPs.
    assert model.get_submodule("conv2.act_quantizer").bop_weight is None
    assert model.get_submodule("act_quantizer").bop_weight == pytest.approx(terms["fc"].macs / terms["conv1"].macs)


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.fc1 = nn.Conv2d(6, 2, 1)
        self.fc2 = nn.Conv2d(2, 6, 1)
        self.out = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = F.hardswish(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.out(torch.cat([x * s, x], dim=1)).mean((2, 3))


def test_multiply_and_concatenation_slices():
    torch.manual_seed(0)
    model = bb.prepare(SqueezeExcite(), torch.rand(1, 3, 4, 4), CONFIG)
    assert isinstance(model.get_submodule("conv").activation, nn.Hardswish)
    assert isinstance(model.get_submodule("fc2").activation, nn.Sigmoid)
    assert "act_quantizer" in quantizer_names(model)  # the multiply's output
    out = next(t for t in model.bb_dataflow.terms if t.name == "out")
    assert [(s.quantizer, s.fraction) for s in out.inputs] == [("act_quantizer", 0.5), ("conv.act_quantizer", 0.5)]
    bb.calibrate(model, torch.rand(8, 3, 4, 4))
    with torch.no_grad():
        model.get_submodule("act_quantizer").gamma_8.fill_(-6.0)  # 4 bits; conv's output stays 32
    row = next(r for r in bb.bop_report(model)["layers"] if r["name"] == "out")
    assert row["input_bits"] == 18  # (4 + 32) / 2


def test_conv1d_linear_3d_and_padding_modes_match_the_float_model():
    torch.manual_seed(0)
    float_model = zoo.SmallCNN().eval()
    x = torch.rand(2, 3, 16, 16)
    model = bb.prepare(float_model, x, bb.QuantConfig(weight_quant=False, act_quant=False)).eval()
    torch.testing.assert_close(model(x), float_model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(model.get_submodule("seq"), QuantConv1d)
    stem = next(n for n in model.graph.nodes if n.target == "stem")
    assert stem.args[0].target == torch.ops.aten.pad.default and stem.args[0].args[2] == "reflect"  # an op of its own
    transformer = zoo.TinyTransformer().eval()
    x = torch.rand(2, 3, 16, 16)
    prepared = bb.prepare(transformer, x, bb.QuantConfig(weight_quant=False, act_quant=False)).eval()
    torch.testing.assert_close(prepared(x), transformer(x), rtol=1e-5, atol=1e-5)
    assert isinstance(prepared.get_submodule("blocks.0.qkv"), QuantLinear)


def test_input_model_untouched_and_prepared_twice_equal():
    float_model = Residual()
    before = {k: v.clone() for k, v in float_model.state_dict().items()}
    a = bb.prepare(float_model, torch.rand(1, 3, 8, 8), CONFIG)
    b = bb.prepare(float_model, torch.rand(1, 3, 8, 8), CONFIG)
    assert all(torch.equal(before[k], v) for k, v in float_model.state_dict().items())
    assert not any(isinstance(m, QuantLayer) for m in float_model.modules())
    assert list(a.state_dict()) == list(b.state_dict())


def test_skip_and_overrides():
    model = bb.prepare(Residual(), torch.rand(1, 3, 8, 8), CONFIG, skip=["conv2"],
                       overrides={"stem": {"weight_bits": 8, "act_bits": 8}, "fc": {"weight_bits": 8},
                                  "conv1": {"prune": False, "gamma_inits": (6, 6, -6, -6)}})
    assert type(model.get_submodule("conv2")) is nn.Conv2d  # left float, BN unfolded
    stem = model.get_submodule("stem")
    assert stem.weight_quantizer.fixed_bits == 8 and stem.act_quantizer.fixed_bits == 8
    conv1 = model.get_submodule("conv1")
    assert conv1.weight_quantizer.gamma_2 is None and float(conv1.weight_quantizer.gamma_16.detach()) == -6
    conv2 = next(t for t in model.bb_dataflow.terms if t.name == "conv2")
    assert conv2.weight is None
    bb.calibrate(model, torch.rand(2, 3, 8, 8))
    rows = {r["name"]: r for r in bb.bop_report(model)["layers"]}
    assert rows["conv2"]["weight_bits"] == "float" and rows["stem"]["weight_bits"] == 8


@pytest.mark.parametrize(("overrides", "match"), [
    ({"x": {"bits": 8}}, "unknown settings"), ({"x": {"weight_bits": 3}}, "weight_bits"),
    ({"x": 8}, "dict of settings"), ({"x": {"gamma_inits": (1, 2)}}, "4 logits")])
def test_bad_overrides(overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bb.prepare(Residual(), torch.rand(1, 3, 8, 8), CONFIG, overrides=overrides)


def test_skipped_layers_export_as_float(tmp_path):
    from bayesian_bits.export import export_model, run_onnxruntime

    model = bb.prepare(Residual(), torch.rand(1, 3, 8, 8), CONFIG, skip=["conv2", "fc"])
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    bb.calibrate(model, x)
    model.eval()
    export_model(model, "onnx", tmp_path / "m.onnx")
    with torch.no_grad():
        torch.testing.assert_close(run_onnxruntime(str(tmp_path / "m.onnx"), x), model(x), rtol=1e-5, atol=1e-5)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x  # data-dependent control flow


class WithBlock(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x))


@pytest.mark.parametrize(("model", "shape", "match"), [
    (nn.Sequential(nn.ConvTranspose2d(3, 3, 2), nn.Conv2d(3, 2, 1)), (1, 3, 4, 4),
     r"module 0 computes ConvTranspose2d .*skip=\['0'\]"),
    (nn.Sequential(nn.Conv3d(3, 3, 1), nn.Flatten(), nn.LazyLinear(2)), (1, 3, 2, 2, 2), "Conv3d"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (1, 4), None),
    (WithBlock(Untraceable()), (1, 4), r"cannot capture WithBlock .* in module block \(Untraceable\)"),
    (nn.Sequential(nn.ReLU()), (1, 4), "has no conv, linear or matmul"),
])
def test_what_prepare_cannot_handle_is_a_clear_error(model, shape, match):
    if match is None:  # a supported model for contrast
        bb.prepare(model, torch.rand(shape), CONFIG)
        return
    with pytest.raises(ValueError, match=match):
        bb.prepare(model, torch.rand(shape), CONFIG)


def test_inputs_that_do_not_run_name_the_models_own_error_and_print_nothing(capsys):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))  # 3 channels in, 1 given
    with pytest.raises(ValueError, match=r"do not run through Sequential: RuntimeError: .*expected input\[1, 1, 8, 8\] "
                       r"to have 3 channels"):
        bb.prepare(model, torch.rand(1, 1, 8, 8), CONFIG)
    assert capsys.readouterr().err == ""


def test_skipped_modules_keep_their_ops_float():
    model = bb.prepare(WithBlock(nn.Sequential(nn.ReLU(), nn.Linear(4, 4))), torch.rand(1, 4), CONFIG,
                       skip=["block"])
    assert type(model.get_submodule("block.1")) is nn.Linear
    assert [t.weight for t in model.bb_dataflow.terms] == [None, "head.weight_quantizer"]


def test_shared_layer_and_prepared_model_are_errors():
    shared = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="more than once"):
        bb.prepare(nn.Sequential(shared, nn.ReLU(), shared), torch.rand(1, 4), CONFIG)
    prepared = bb.prepare(nn.Sequential(nn.Linear(4, 4)), torch.rand(1, 4), CONFIG)
    with pytest.raises(ValueError, match="already quantized"):
        bb.prepare(prepared, torch.rand(1, 4), CONFIG)
    with pytest.raises(TypeError, match="example_inputs"):
        bb.prepare(nn.Linear(4, 4), [torch.rand(1, 4)], CONFIG)


# ---- the zoo: torchvision classification models at small inputs, a custom CNN, an MLP, a transformer ----

ZOO = zoo.ZOO


def zoo_model(name: str) -> tuple[nn.Module, torch.Tensor, nn.Module]:
    float_model, x = zoo.zoo_float_model(name)
    model = bb.prepare(float_model, x, ZOO_CONFIG)
    torch.manual_seed(0)  # the calibration forward samples the gates: its ranges depend on the draws
    bb.calibrate(model, x)
    return model, x, float_model


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_train_step_and_bop_report(name):
    model, x, float_model = zoo_model(name)
    assert bb.bop_report(model)["total_macs"] == flop_counter_macs(float_model, x[:1])
    bb.assign_macs(model)
    loss = F.cross_entropy(model.train()(x), torch.arange(4) % 10) + 0.01 * bb.regularizer(model)
    loss.backward()
    for n, p in model.named_parameters():
        if "gamma_" in n or "x_max" in n:
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), n
    assert any(q.gamma_2 is not None for _, q in bb.quantizers(model))
    assert all(isinstance(m, (QuantConv1d, QuantConv2d, QuantLinear)) for m in model.modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)))
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()
    assert isinstance(bb.quantizers(model)[0][1], BayesianBitsQuantizer)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_exports(name, tmp_path, one_thread):
    """Every export format of an in-memory prepared model: the ONNX graph in a default onnxruntime session computes
    the pruned model; the pruned and packed files load back into the model prepared again."""
    from bayesian_bits.export import export_model, load_packed, load_pruned

    model, x, float_model = zoo_model(name)
    randomize_gates(model)
    model.eval()
    for fmt in ("manifest", "pruned", "packed"):
        export_model(model, fmt, tmp_path / f"m.{fmt}")
    assert_onnx_deploys(model, x)
    xs = torch.rand(16, *x.shape[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(xs)
    skeleton = bb.prepare(float_model, x, ZOO_CONFIG)
    pruned = load_pruned(tmp_path / "m.pruned", skeleton=skeleton)
    with torch.no_grad():
        out = pruned(xs)
        assert_agrees(out, ref)
        assert torch.equal(load_packed(tmp_path / "m.packed", skeleton=skeleton)(xs), out)


@pytest.mark.parametrize("name", prepare_pins.NAMES)
def test_capture_keeps_the_pinned_placement_macs_and_outputs(name):
    """The CNN zoo and the paper models as the torch.fx capture prepared them (tests/data/prepare_pins.json):
    the same quantizers in the same order, MACs and input slices of every layer and matmul, regions, BOPs at init;
    eval outputs equal up to fp32 summation order."""
    pinned = json.loads(prepare_pins.PINS.read_text())[name]
    got = prepare_pins.values(name)
    for key in ("logits", "logits_abs"):
        torch.testing.assert_close(torch.tensor(got.pop(key)), torch.tensor(pinned.pop(key)), rtol=1e-5, atol=1e-6)
    assert got == pinned
