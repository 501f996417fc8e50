"""Regulariser, MAC assignment, BOP report and fixed-gate conversion (SPEC B §3, §6.9)."""

from __future__ import annotations

import json

import pytest
import torch

import bayesian_bits as bb
from bayesian_bits.gates import prob_on

LENET = (2, 1, 28, 28)
LENET_MACS = {"features.0": 460_800, "features.2": 3_276_800, "classifier.0": 524_288, "classifier.1": 5_120}
SMALL_IMAGENET = (2, 3, 64, 64)


def sub(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name)


def calibrated(name: str, config: bb.QuantConfig, shape: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = bb.build_model(name, config)
    bb.calibrate(model, torch.rand(shape))
    return model


def test_lenet5_all_8bit_is_6_25_percent():
    model = calibrated("lenet5quantized", bb.QuantConfig(6, 6, -6, -6, include_pruning=True), LENET)
    report = bb.bop_report(model)
    assert report["relative_bops"] == pytest.approx(6.25)
    assert report["weight_bit_counts"] == {"8": 4} and report["act_bit_counts"] == {"8": 3}
    assert report["total_macs"] == 4_267_008
    json.loads(json.dumps(report))  # JSON-able
    text = bb.format_report(report)
    assert "relative bops: 6.25%" in text and "classifier.1" in text


def test_resnet18_all_16bit_is_24_19_percent():
    model = calibrated("resnet18", bb.QuantConfig(6, 6, 6, -6, include_pruning=True), SMALL_IMAGENET)
    report = bb.bop_report(model)
    assert round(report["relative_bops"], 2) == 24.19
    assert report["weight_bit_counts"] == {"16": 21} and report["act_bit_counts"] == {"16": 28}
    assert report["gbops_baseline"] == pytest.approx(1_814_073_344 * 1024 / 1e9)
    assert len(report["layers"]) == 21 and len(report["quantizers"]) == 49


def test_pruned_channels_in_lenet_bops():
    """keep = kept output channels × kept input channels (previous layer's mask, across the flatten too)."""
    model = calibrated("lenet5quantized", bb.QuantConfig(6, 6, -6, -6, include_pruning=True), LENET)
    with torch.no_grad():
        sub(model, "features.0").weight_quantizer.gamma_2[:8] = -1.0  # 8 of 32 off (eval threshold −0.935)
        sub(model, "features.2").weight_quantizer.gamma_2[:16] = -1.0  # 16 of 64 off
    report = bb.bop_report(model)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["features.0"]["kept_out_pct"] == 75.0 and rows["features.2"]["kept_in_pct"] == 75.0
    assert rows["classifier.0"]["kept_in_pct"] == 75.0  # the features.2 mask, through the flatten
    keep = {"features.0": 0.75, "features.2": 0.75 * 0.75, "classifier.0": 0.75, "classifier.1": 1.0}
    bits_in = {"features.0": 8, "features.2": 8, "classifier.0": 8, "classifier.1": 8}
    expected = sum(LENET_MACS[n] * bits_in[n] * 8 * keep[n] for n in LENET_MACS) / (4_267_008 * 1024)
    assert report["relative_bops"] == pytest.approx(100 * expected)


def test_resnet18_counts_input_pruning_only_inside_blocks():
    model = calibrated("resnet18", bb.QuantConfig(6, 6, 6, -6, include_pruning=True), SMALL_IMAGENET)
    with torch.no_grad():
        sub(model, "layer1.0.conv1").weight_quantizer.gamma_2[:32] = -5.0
        sub(model, "conv1").weight_quantizer.gamma_2[:32] = -5.0
    rows = {r["name"]: r for r in bb.bop_report(model)["layers"]}
    assert rows["layer1.0.conv1"]["kept_out_pct"] == 50.0
    assert rows["layer1.0.conv2"]["kept_in_pct"] == 50.0
    assert rows["layer1.0.conv1"]["kept_in_pct"] == 100.0  # block input: not counted (§3.5)


def test_mobilenetv2_counts_input_channel_pruning():  # A2 fix
    model = calibrated("mobilenetv2", bb.QuantConfig(6, 6, 6, -6, include_pruning=True), SMALL_IMAGENET)
    with torch.no_grad():
        sub(model, "features.2.conv.0.0").weight_quantizer.gamma_2[:48] = -5.0  # 48 of 96 expanded channels
    rows = {r["name"]: r for r in bb.bop_report(model)["layers"]}
    assert rows["features.2.conv.0.0"]["kept_out_pct"] == 50.0
    dw, proj = rows["features.2.conv.1.0"], rows["features.2.conv.2"]
    assert dw["kept_in_pct"] == 50.0 and dw["kept_out_pct"] == 100.0  # depthwise: not pruned itself
    assert dw["gbops"] == pytest.approx(dw["macs"] * 16 * 16 * 0.5 / 1e9)
    assert proj["kept_in_pct"] == 50.0  # the dead channels stay dead through the depthwise conv


def _level_sum(q, cost):
    q4, q8, q16, q32 = prob_on(q.gammas.detach()).tolist()
    return cost(4) * q4 + cost(8) * q4 * q8 + cost(16) * q4 * q8 * q16 + cost(32) * q4 * q8 * q16 * q32


def test_regularizer_const_by_hand():
    model = calibrated("lenet5quantized", bb.QuantConfig(2, 0, -1, 1, include_pruning=True), LENET)
    expected = 0.0
    for _, q in bb.quantizers(model):
        levels = _level_sum(q, lambda b: 1.0)
        if q.gamma_2 is None:
            expected += 1.0 + levels
        else:
            expected += float((prob_on(q.gamma_2.detach()) * (1.0 + levels)).mean())
    assert bb.regularizer(model).item() == pytest.approx(expected, rel=1e-6)


def test_regularizer_bop_by_hand():
    model = calibrated("lenet5quantized", bb.QuantConfig(2, 0, -1, 1, include_pruning=True, reg_type="bop"), LENET)
    with torch.no_grad():
        sub(model, "features.2").weight_quantizer.gamma_2[:10] = -3.0
    macs = bb.assign_macs(model)
    assert macs == LENET_MACS
    top = 3_276_800
    # Weight quantizers: own layer's MACs; activation quantizers: the layer they feed (sequential groups).
    weights = {
        "features.0.weight_quantizer": LENET_MACS["features.0"],
        "features.2.weight_quantizer": LENET_MACS["features.2"],
        "classifier.0.weight_quantizer": LENET_MACS["classifier.0"],
        "classifier.1.weight_quantizer": LENET_MACS["classifier.1"],
        "features.0.act_quantizer": LENET_MACS["features.2"],
        "features.2.act_quantizer": LENET_MACS["classifier.0"],
        "classifier.0.act_quantizer": LENET_MACS["classifier.1"],
    }
    expected = 0.0
    for name, q in bb.quantizers(model):
        m = weights[name] / top
        assert q.bop_weight == pytest.approx(m)
        levels = _level_sum(q, lambda b, m=m: m * b)
        if q.gamma_2 is None:
            expected += 1.0 + levels
        else:
            expected += float((prob_on(q.gamma_2.detach()) * (2 * m + levels)).mean())
    reg = bb.regularizer(model)
    assert reg.item() == pytest.approx(expected, rel=1e-6)
    reg.backward()
    q = sub(model, "features.2").weight_quantizer
    assert q.bank.channel_rows(q.bank.gamma_logits.grad)[q.row].abs().min() > 0


def test_resnet18_mac_weights_and_ungrouped_quantizers():
    model = calibrated("resnet18", bb.QuantConfig(6, 6, 6, -6, include_pruning=True, reg_type="bop"), SMALL_IMAGENET)
    bb.assign_macs(model)
    top = 118_013_952
    out = sub(model, "layer1.1.act_quantizer")  # feeds layer2.0 conv1 and its downsample
    assert out.bop_weight == pytest.approx((57_802_752 + 6_422_528) / top)
    pre_add = sub(model, "layer1.0.conv2.act_quantizer")
    assert pre_add.bop_weight is None
    assert pre_add.regularizer().item() == pytest.approx(4.009, abs=1e-3)  # 1 + q4 + q4q8 + … at init
    ungrouped = [n for n, q in bb.quantizers(model) if q.bop_weight is None]
    assert len(ungrouped) == 11


def test_prune_only_activation_quantizers_get_no_macs():
    config = bb.QuantConfig(include_pruning=True, prune_only=True, fixed_48bit=True, reg_type="bop")
    model = calibrated("lenet5quantized", config, LENET)
    bb.assign_macs(model)
    assert all(q.bop_weight is None for n, q in bb.quantizers(model) if n.endswith("act_quantizer"))
    report = bb.bop_report(model)
    assert report["weight_bit_counts"] == {"4": 4} and report["act_bit_counts"] == {"8": 3}


@pytest.mark.parametrize(("name", "shape"), [("vggquantized", (4, 3, 32, 32)), ("resnet18", SMALL_IMAGENET)])
def test_convert_to_fixed(name, shape):
    """Fixed gates with the eval bit widths and masks, BN folded statically (linear layers too), state kept.

    At 2 bits the gated chain and the fixed-bit quantizer are bit-identical (§1.6), so outputs must agree.
    """
    config = bb.QuantConfig(-6, -6, -6, -6, include_pruning=True)
    model = calibrated(name, config, shape)
    with torch.no_grad():
        first = next(q for _, q in bb.quantizers(model) if q.gamma_2 is not None)
        first.gamma_2[:3] = -5.0
    x = torch.rand(shape)
    model.eval()
    before = model(x).detach()
    report = bb.bop_report(model)
    bb.convert_to_fixed(model)
    assert not any("gamma_" in n for n, _ in model.named_parameters())
    assert all(m.bn is None for m in model.modules() if isinstance(m, bb.QuantLayer))
    assert bb.regularizer(model).item() == 0.0
    after = model(x).detach()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    fixed_report = bb.bop_report(model)
    assert fixed_report["relative_bops"] == pytest.approx(report["relative_bops"])
    # A fresh converted model restores masks and bit widths from the state_dict (A2).
    fresh = calibrated(name, bb.QuantConfig(include_pruning=True), shape)
    bb.convert_to_fixed(fresh)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert torch.equal(fresh(x), after)
    assert bb.bop_report(fresh)["relative_bops"] == pytest.approx(report["relative_bops"])
    model.train()
    model(x).sum().backward()
    assert all(q.x_max.grad is not None for q in model.modules() if isinstance(q, bb.FixedQuantizer))
