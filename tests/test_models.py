"""The four models: structure, MAC tables, float→prepared conversion, bad input, checkpoints (SPEC B §3.7, §5)."""

from __future__ import annotations

import pytest
import torch

import bayesian_bits as bb
from bayesian_bits import models
from bayesian_bits.models import build_float_model, build_model, torchvision_model

RESNET_MACS_3X3, RESNET_MACS_3X3_S2, RESNET_MACS_DS = 115_605_504, 57_802_752, 6_422_528
SMALL_IMAGENET = (2, 3, 64, 64)


def calibrated(name: str, config: bb.QuantConfig, shape: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, config)
    bb.calibrate(model, torch.rand(shape))
    return model


# ---- MAC tables (§3.7), counted at the spec's batch-1 input shapes ----


def test_lenet5_macs():
    macs = bb.count_macs(build_model("lenet5quantized"))
    assert macs == {"features.0": 460_800, "features.2": 3_276_800, "classifier.0": 524_288, "classifier.1": 5_120}
    assert sum(macs.values()) == 4_267_008


def test_vgg7_macs():
    macs = bb.count_macs(build_model("vggquantized"))
    big, half = 150_994_944, 75_497_472
    assert macs == {
        "features.0": 3_538_944,
        "features.1": big,
        "features.3": half,
        "features.4": big,
        "features.6": half,
        "features.7": big,
        "classifier.0": 8_388_608,
        "classifier.1": 10_240,
    }
    assert sum(macs.values()) == 615_917_568


def test_resnet18_macs_on_the_quantized_model():
    model = calibrated("resnet18", bb.QuantConfig(include_pruning=True), SMALL_IMAGENET)
    macs = bb.count_macs(model)
    assert sum(macs.values()) == 1_814_073_344 and max(macs.values()) == 118_013_952
    assert macs.pop("conv1") == 118_013_952 and macs.pop("fc") == 512_000
    for name, value in macs.items():
        if "downsample" in name:
            assert value == RESNET_MACS_DS, name
        elif name.endswith(".0.conv1") and not name.startswith("layer1."):
            assert value == RESNET_MACS_3X3_S2, name  # stride-2 first convs of layers 2–4
        else:
            assert value == RESNET_MACS_3X3, name
    assert len(macs) == 19


def test_mobilenetv2_macs():
    macs = bb.count_macs(build_model("mobilenetv2"))
    assert sum(macs.values()) == 300_774_272
    assert max(macs, key=macs.get) == "features.18.0" and macs["features.18.0"] == 20_070_400


# ---- structure (§5) ----


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_float_model("lenet5quantized")) == 582_026
    assert count(build_float_model("vggquantized")) == 12_979_082


def test_resnet18_quantizers_and_parameter_groups():
    model = build_model("resnet18", bb.QuantConfig(include_pruning=True))
    qs = bb.quantizers(model)
    assert len(qs) == 49 and sum(q.gamma_2 is not None for _, q in qs) == 20
    names = [n for n, _ in model.named_parameters()]
    gate_names = [n for n in names if "gamma_" in n]
    range_names = [n for n in names if "x_max" in n or "x_min" in n]
    # The reference's 216 gate tensors (49 × 4 level logits, 20 pruning vectors) are one flat parameter here.
    channels = sum(q.gamma_2.numel() for _, q in qs if q.gamma_2 is not None)
    assert gate_names == ["bb_gates.gamma_logits"] and model.bb_gates.gamma_logits.numel() == 49 * 4 + channels
    assert len(names) - len(gate_names) - len(range_names) == 62
    assert len(range_names) == 49  # x_max only: x_min never enters the forward pass (§1.3), it is a buffer
    assert model.fc.weight_quantizer.gamma_2 is None and model.fc.act_quantizer is None


def test_mobilenetv2_quantizers_and_unpruned_depthwise():
    model = build_model("mobilenetv2", bb.QuantConfig(include_pruning=True))
    qs = dict(bb.quantizers(model))
    assert len(qs) == 115
    for name, layer in model.named_modules():
        if isinstance(layer, bb.QuantConv2d) and layer.groups > 1:
            assert layer.weight_quantizer.gamma_2 is None, name
    assert sum(q.gamma_2 is not None for q in qs.values()) == 52 - 17
    blocks = [f"features.{i}" for i in range(1, 18)]
    assert sum(hasattr(model.get_submodule(b), "act_quantizer") for b in blocks) == 10  # after residual adds


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_prepare_carries_weights_and_bn_statistics(name):
    torch.manual_seed(0)
    tv = torchvision_model(name)
    with torch.no_grad():  # non-trivial BN statistics
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    tv.eval()
    float_prepared = bb.prepare(tv, torch.zeros(1, 3, 64, 64), bb.QuantConfig(weight_quant=False, act_quant=False))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(float_prepared.eval()(x), tv(x), rtol=1e-4, atol=1e-4)
    quantized = bb.prepare(tv, torch.zeros(1, 3, 64, 64), bb.QuantConfig())
    tv_bns = [m for m in tv.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    our_bns = [quantized.get_submodule(t.name).bn for t in quantized.bb_dataflow.terms
               if quantized.get_submodule(t.name).bn is not None]
    assert len(tv_bns) == len(our_bns)
    for a, b in zip(tv_bns, our_bns, strict=True):
        torch.testing.assert_close(a.running_var, b.running_var)
        torch.testing.assert_close(a.weight, b.weight)
    assert all(isinstance(m, torch.nn.BatchNorm2d) for m in tv.modules() if "bn" in type(m).__name__.lower())


def test_pretrained_download_failure_is_clear(monkeypatch):
    class Offline:
        url = "https://example.invalid/resnet18.pth"

        def get_state_dict(self, **_kwargs):
            raise OSError("network unreachable")

    monkeypatch.setitem(models.MODELS, "resnet18", models.MODELS["resnet18"].__class__(
        models.MODELS["resnet18"].build, (3, 224, 224), 1000, Offline()))
    with pytest.raises(RuntimeError, match=r"could not load torchvision's pretrained resnet18 weights.*download"):
        build_model("resnet18", pretrained=True)
    with pytest.raises(ValueError, match="trained from scratch"):
        build_model("lenet5quantized", pretrained=True)


def test_num_classes():
    model = build_model("resnet18", bb.QuantConfig(), num_classes=10)
    assert model.get_submodule("fc").out_features == 10
    assert build_model("lenet5quantized", num_classes=7).get_submodule("classifier.1").out_features == 7


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        build_model("resnet50")


# ---- use: bad input, calibration, training step, checkpoints ----


def test_plain_model_is_an_error_everywhere():
    plain = build_float_model("lenet5quantized")
    for call in (bb.bop_report, bb.assign_macs, bb.count_macs, bb.regularizer, bb.convert_to_fixed,
                 lambda m: bb.calibrate(m, torch.rand(2, 1, 28, 28))):
        with pytest.raises(ValueError, match="prepare"):
            call(plain)


def test_model_before_calibration_raises():
    model = build_model("lenet5quantized")
    with pytest.raises(RuntimeError, match="calibrate"):
        model(torch.rand(2, 1, 28, 28))


@pytest.mark.parametrize(("name", "shape"), [("resnet18", SMALL_IMAGENET), ("mobilenetv2", (2, 3, 32, 32))])
def test_imagenet_models_train_step_and_eval(name, shape):
    model = calibrated(name, bb.QuantConfig(6, 6, 6, -6, include_pruning=True), shape)
    x = torch.rand(shape)
    loss = model(x).logsumexp(1).mean() + 0.01 * bb.regularizer(model)
    loss.backward()
    q = model.get_submodule("conv1" if name == "resnet18" else "features.0.0").weight_quantizer
    grad = q.bank.gamma_logits.grad
    levels, channels = q.bank.level_rows(grad)[q.row], q.bank.channel_rows(grad)[q.row]
    assert channels.abs().sum() > 0 and q.x_max.grad is not None and levels[0] != 0
    assert levels[3].abs().item() < 1e-3  # skipped gate: regulariser gradient only
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_state_dict_round_trip_restores_identical_eval_model():
    config = bb.QuantConfig(6, 6, -6, -6, include_pruning=True)
    model = calibrated("lenet5quantized", config, (2, 1, 28, 28))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(8, 1, 28, 28)
    for _ in range(3):
        opt.zero_grad()
        (model(x).logsumexp(1).mean() + bb.regularizer(model)).backward()
        opt.step()
    with torch.no_grad():
        model.get_submodule("features.0").weight_quantizer.gamma_2[:5] = -4.0
        model.get_submodule("classifier.0").act_quantizer.gamma_8.fill_(-3.0)
    model.train()
    model(x)  # the skip ratchet fires in training
    state = model.state_dict()
    fresh = build_model("lenet5quantized", config)
    fresh.load_state_dict(state)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert bb.bop_report(model) == bb.bop_report(fresh)
    assert fresh.get_submodule("classifier.0").act_quantizer.bit_width() == 4


def test_prune_only_works_on_every_model():  # A2: the reference crashed on LeNet, VGG and MobileNetV2
    config = bb.QuantConfig(include_pruning=True, prune_only=True)
    for name, shape in [("lenet5quantized", (2, 1, 28, 28)), ("vggquantized", (2, 3, 32, 32))]:
        model = calibrated(name, config, shape)
        model(torch.rand(shape)).sum().backward()
        report = bb.bop_report(model)
        assert report["act_bit_counts"] == {}
        # Float weights show as float (counted at 32 bits in BOPs, A2); the logits layer stays gated, at 32 bits.
        assert report["weight_bit_counts"] == {"32": 1, "float": len(report["layers"]) - 1}


def test_quantizers_lists_frozen_ones_and_reports_float_as_float():
    config = bb.QuantConfig(include_pruning=True, prune_only=True)
    model = calibrated("lenet5quantized", config, (2, 1, 28, 28)).eval()
    before = bb.bop_report(model)
    names = [n for n, _ in bb.quantizers(model)]
    modes = {n: q.mode for n, q in bb.quantizers(model)}
    assert modes["features.0.weight_quantizer"] is bb.Mode.FLOAT
    assert modes["classifier.1.weight_quantizer"] is bb.Mode.GATED  # the logits layer ignores prune-only (A2)
    bb.convert_to_fixed(model)
    frozen = bb.quantizers(model)
    assert [n for n, _ in frozen] == names and all(isinstance(q, bb.FixedQuantizer) for _, q in frozen)
    assert {n: q.mode for n, q in frozen} == {**modes, "classifier.1.weight_quantizer": bb.Mode.FIXED}
    after = bb.bop_report(model)
    assert after["relative_bops"] == before["relative_bops"]
    rows = {r["name"]: r for r in after["quantizers"]}
    assert (rows["features.0.weight_quantizer"]["bits"], rows["features.0.weight_quantizer"]["mode"]) == \
        ("float", "float")
    assert rows["classifier.1.weight_quantizer"]["bits"] == 32
    assert bb.format_report(after).split("\n")[2].split()[3] == "float"  # features.0's W column
