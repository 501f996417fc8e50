"""Gates, the quantizer module and the quantized layers with BN folding (SPEC B §1, §2, §4)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bbkernels
from bayesian_bits import gates
from bayesian_bits.layers import QuantConv2d, QuantLinear
from bayesian_bits.quantizer import BayesianBitsQuantizer, FixedQuantizer, Mode


def calibrated(x: torch.Tensor, **kwargs) -> BayesianBitsQuantizer:
    q = BayesianBitsQuantizer(**kwargs)
    q.calibrating = "q"
    with torch.no_grad():
        q(x)
    q.calibrating = None
    return q


# ---- gates (§1.9, §2) ----


def test_prob_on_matches_spec_values():
    gammas = torch.tensor([6.0, 2.0, 0.0, -2.0, -6.0])
    expected = [0.99950, 0.97337, 0.83182, 0.40098, 0.01211]
    assert gates.prob_on(gammas).tolist() == pytest.approx(expected, abs=5e-6)
    assert gates.OFFSET == pytest.approx(-1.5985968485, abs=1e-9)


def test_eval_threshold_at_minus_0_9353():
    assert gates.eval_gate(torch.tensor([-0.9352, -0.9354])).tolist() == [1.0, 0.0]


def test_training_samples_follow_hard_concrete():
    torch.manual_seed(0)
    z = gates.sample(torch.full((200_000,), 6.0))
    assert z.min() >= 0 and z.max() <= 1
    # P(z = 0) = σ(offset − gamma); P(z = 1) = σ(gamma − β·ln 11) ≈ 0.988 at gamma = 6 (§2).
    assert float((z == 0).float().mean()) == pytest.approx(
        float(torch.sigmoid(torch.tensor(gates.OFFSET - 6))), abs=3e-4
    )
    assert float((z == 1).float().mean()) == pytest.approx(1 / (1 + math.exp(-(6 - 2 / 3 * math.log(11)))), abs=2e-3)


def test_fixed_gating_is_the_hard_sigmoid():
    g = gates.gate(torch.tensor([0.0, 10.0, -10.0]), training=True, method="fixed")
    assert g.tolist() == pytest.approx([0.5, 1.0, 0.0])


# ---- quantizer module ----


def test_range_init_from_first_forward():
    w = torch.tensor([[-2.61, 0.5], [3.41, 1.0]])
    q = calibrated(w, channels=2)
    assert q.is_signed and q.x_max.item() == pytest.approx(3.41) and float(q.x_min) == pytest.approx(-2.61)
    relu = calibrated(torch.rand(4, 3, 5, 5))
    assert not relu.is_signed and float(relu.x_min) == 0.0
    with pytest.warns(UserWarning, match=r"no positive value \(min -2\.5\)"):
        negative = calibrated(-torch.tensor([0.5, 2.5, 1.0]))  # the reference's [0, max] would be empty
    assert negative.is_signed and float(negative.x_max) == 2.5
    with pytest.warns(UserWarning, match="all zero"):
        zero = calibrated(torch.zeros(3, 4), channels=3)  # a zero-initialised head
    assert zero.is_signed and float(zero.x_min) == -1.0 and float(zero.x_max) == 1.0


def test_forward_before_calibration_raises():
    with pytest.raises(RuntimeError, match=r"calibrate\(model, images\)"):
        BayesianBitsQuantizer()(torch.randn(3))


def test_integer_input_raises():
    q = calibrated(torch.randn(8))
    with pytest.raises(TypeError, match="floating-point"):
        q(torch.arange(8))


def test_module_equals_reference_operator():
    torch.manual_seed(1)
    x = torch.randn(6, 4, 3, 3)
    q = calibrated(x, channels=6, gamma_inits=(3.0, 1.0, -0.5, 0.2))
    with torch.no_grad():
        q.gamma_2.copy_(torch.tensor([6.0, -1.0, 0.2, 2.0, -0.93, 1.0]))
    q.train()
    torch.manual_seed(7)
    y = q(x)
    y.backward(torch.linspace(-1, 1, x.numel()).reshape(x.shape))
    got = {n: p.grad for n, p in q.named_parameters()}
    q.zero_grad()
    torch.manual_seed(7)  # same noise: one draw for the level and channel gates, as in forward
    levels, g2 = q.bank.row_gates(q.row)
    ref = bbkernels.reference.bb_quantize(x, q.x_max, levels, g2, signed=True)
    ref.backward(torch.linspace(-1, 1, x.numel()).reshape(x.shape))
    torch.testing.assert_close(y, ref)
    for name, p in q.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_eval_module_is_the_deployed_quantizer():
    """Eval mode: one grid step at the eval bit width times the eval mask (bbkernels/deployed.py), with or without
    autograd; the residual chain gives the same values but at rounding ties."""
    torch.manual_seed(1)
    x = torch.randn(6, 4, 3, 3, requires_grad=True)
    q = calibrated(x.detach(), channels=6, gamma_inits=(3.0, 1.0, -3.0, 0.2))
    with torch.no_grad():
        q.gamma_2.copy_(torch.tensor([6.0, -1.0, 0.2, 2.0, -0.93, 1.0]))
    q.eval()
    y = q(x)
    grid = bbkernels.grid(float(q.x_max), q.bit_width(), True)
    assert q.bit_width() == 8
    assert torch.equal(y, bbkernels.deployed_quantize(x.detach(), grid, q.keep_mask()))
    chain = bbkernels.reference.bb_quantize(x.detach(), q.x_max.detach(), *q.bank.row_gates(q.row), signed=True)
    torch.testing.assert_close(y, chain, rtol=0, atol=1e-5 * float(grid.hi))
    y.sum().backward()  # straight through inside the clip range, to x only
    inside = (x.detach() >= grid.lo) & (x.detach() <= grid.hi)
    assert torch.equal(x.grad, q.keep_mask().reshape(-1, 1, 1, 1) * inside.float())
    assert q.x_max.grad is None


def test_skip_rule_chain_and_permanence():
    x = torch.randn(100)
    q = calibrated(x, gamma_inits=(6.0, 6.0, -2.0, 6.0))
    assert q.bit_width() == 8
    assert q.alive.tolist() == [True, True, False, True]
    g = q.level_gates()
    assert g[2:].tolist() == [0.0, 0.0]  # gamma_16 <= −2 also ends gamma_32
    q.gamma_16.data.fill_(5.0)  # coming back above −2 does not revive the gate
    for training in (True, False):
        q.train(training)
        assert q.level_gates()[2:].tolist() == [0.0, 0.0]
    assert q.bit_width() == 8
    q.train()
    q(x).sum().backward()
    assert q.bank.level_rows(q.bank.gamma_logits.grad)[q.row, 2:].tolist() == [0.0, 0.0]
    # The ratchet survives a state_dict round trip.
    fresh = BayesianBitsQuantizer()
    fresh.load_state_dict(q.state_dict())
    assert fresh.bit_width() == 8 and fresh.is_calibrated and fresh.is_signed == q.is_signed


@pytest.mark.parametrize(
    ("inits", "bits"),
    [((6, 6, -6, -6), 8), ((6, 6, 6, -6), 16), ((6, 6, 6, 6), 32), ((-1, 6, 6, 6), 2), ((6, -0.9354, 6, 6), 4)],
)
def test_eval_bit_width(inits, bits):
    assert calibrated(torch.randn(10), gamma_inits=inits).bit_width() == bits


def test_fixed_bit_and_prune_only_modes():
    torch.manual_seed(0)
    w = torch.randn(4, 3)
    fixed = calibrated(w, channels=4, mode=Mode.FIXED, fixed_bits=4).eval()
    torch.testing.assert_close(fixed(w), bbkernels.reference.fixed_quantize(w, fixed.x_max, 4, signed=True))
    both = calibrated(w, channels=4, mode=Mode.FIXED, fixed_bits=8, prune_only=True).eval()
    both.gamma_2.data[1] = -5.0
    expect = bbkernels.reference.fixed_quantize(w, both.x_max, 8, torch.tensor([1.0, 0, 1, 1]), signed=True)
    torch.testing.assert_close(both(w), expect)
    prune = calibrated(w, channels=4, mode=Mode.FLOAT).eval()
    prune.gamma_2.data[2] = -5.0
    torch.testing.assert_close(prune(w), w * torch.tensor([1.0, 1, 0, 1])[:, None])
    assert prune.mode is Mode.FLOAT and prune.bit_width() is None and prune.prune_only  # float: no bit width


def test_quantizer_modes_are_explicit():
    with pytest.raises(ValueError, match="fixed_bits is the bit width of mode FIXED"):
        BayesianBitsQuantizer(mode=Mode.FIXED)
    with pytest.raises(ValueError, match="fixed_bits is the bit width of mode FIXED"):
        BayesianBitsQuantizer(fixed_bits=8)
    with pytest.raises(ValueError, match="fixed_bits must be one of"):
        BayesianBitsQuantizer(mode=Mode.FIXED, fixed_bits=3)
    with pytest.raises(ValueError, match="bits must be one of"):
        FixedQuantizer(torch.tensor([1.0]), signed=True, bits=0)
    assert BayesianBitsQuantizer().mode is Mode.GATED
    assert BayesianBitsQuantizer(mode="fixed", fixed_bits=4).mode is Mode.FIXED
    mask = torch.tensor([1.0, 0.0, 1.0])
    flt = FixedQuantizer(torch.tensor([0.5]), signed=True, bits=None, mask=mask)
    x = torch.randn(3, 4)
    assert flt.mode is Mode.FLOAT and flt.bit_width() is None
    assert torch.equal(flt(x), x * mask[:, None])  # float: not clipped to x_max, only masked
    fresh = FixedQuantizer(torch.tensor([1.0]), signed=True, bits=8, mask=torch.ones(3))
    fresh.load_state_dict(flt.state_dict())  # checkpoints store a float quantizer's bits as 0
    assert fresh.mode is Mode.FLOAT and int(flt.state_dict()["bits"]) == 0


def test_fixed_quantizer_keeps_bits_and_mask_in_state_dict():
    q = FixedQuantizer(torch.tensor([2.0]), signed=True, bits=4, mask=torch.tensor([1.0, 0.0]))
    fresh = FixedQuantizer(torch.tensor([1.0]), signed=False, bits=8, mask=torch.ones(2))
    fresh.load_state_dict(q.state_dict())
    assert (fresh.bit_width(), fresh.is_signed, fresh.mask.tolist()) == (4, True, [1.0, 0.0])
    x = torch.randn(2, 5)
    torch.testing.assert_close(fresh(x), bbkernels.reference.fixed_quantize(x, q.x_max, 4, q.mask, signed=True))


# ---- BN folding (§4.3) ----


class NoQuantizer(nn.Module):
    """A weight "quantizer" that leaves the weight as it is (times a per-channel output factor, as quantizers take)."""

    def forward(self, x, channel_scale=None):
        return x if channel_scale is None else x * channel_scale.reshape(-1, *(1,) * (x.dim() - 1))


def _folded_pair(kind: str, activation: type[nn.Module] | None = None, bn_fold: str = "exact"):
    torch.manual_seed(0)
    act = [] if activation is None else [activation()]
    if kind in ("conv", "depthwise"):
        groups = 5 if kind == "depthwise" else 1
        layer = QuantConv2d(
            5,
            5,
            3,
            padding=1,
            groups=groups,
            bias=False,
            bn=nn.BatchNorm2d(5),
            activation=act[0] if act else None,
            weight_quantizer=NoQuantizer(),
            bn_fold=bn_fold,
        )
        ref = nn.Sequential(nn.Conv2d(5, 5, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(5), *act)
        x = torch.randn(4, 5, 6, 6)
    else:
        layer = QuantLinear(7, 5, bias=False, bn=nn.BatchNorm1d(5), activation=act[0] if act else None,
                            weight_quantizer=NoQuantizer(), bn_fold=bn_fold)
        ref = nn.Sequential(nn.Linear(7, 5, bias=False), nn.BatchNorm1d(5), *act)
        x = torch.randn(8, 7)
    with torch.no_grad():
        ref[0].weight.copy_(layer.weight)
        for bn in (ref[1], layer.bn):
            bn.weight.copy_(torch.linspace(0.5, 2.0, 5))
            bn.bias.copy_(torch.linspace(-1.0, 5.0, 5))  # some outputs above the ReLU6 cap
            bn.running_mean.copy_(torch.linspace(-0.2, 0.3, 5))
            bn.running_var.copy_(torch.linspace(0.5, 1.5, 5))
    return layer, ref, x


@pytest.mark.parametrize("bn_fold", ["exact", "fast"])
@pytest.mark.parametrize(
    ("kind", "activation"),
    [("conv", None), ("linear", None), ("conv", nn.ReLU), ("depthwise", nn.ReLU6), ("linear", nn.ReLU)],
)
def test_bn_folding_equals_batchnorm(kind, activation, bn_fold):
    """With the quantizer off both folds are BatchNorm: outputs, gradients, running statistics (the fast fold's
    γ learns through BatchNorm alone, as float BatchNorm's does)."""
    layer, ref, x = _folded_pair(kind, activation, bn_fold)
    for _ in range(2):  # training: batch statistics, running statistics updated alike
        y, y_ref = layer(x), ref(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        (y * probe).sum().backward()
        (y_ref * probe).sum().backward()
        for ours, theirs in [
            (layer.weight, ref[0].weight),
            (layer.bn.weight, ref[1].weight),
            (layer.bn.bias, ref[1].bias),
        ]:
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-4)
        x = x * 1.5 + 0.3
    torch.testing.assert_close(layer.bn.running_mean, ref[1].running_mean)
    torch.testing.assert_close(layer.bn.running_var, ref[1].running_var)
    assert int(layer.bn.num_batches_tracked) == 2
    layer.eval()
    ref.eval()
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_frozen_bn_uses_running_statistics_in_training():
    layer, ref, x = _folded_pair("conv")
    layer.freeze_bn()
    ref.eval()
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    assert int(layer.bn.num_batches_tracked) == 0


def test_quantized_layer_pipeline_order():
    """Weight quantizer on the folded weight, activation, then the output quantizer (unsigned after ReLU)."""
    torch.manual_seed(0)
    layer = QuantConv2d(
        3,
        4,
        3,
        bias=False,
        bn=nn.BatchNorm2d(4),
        activation=nn.ReLU(),
        weight_quantizer=BayesianBitsQuantizer(4, gamma_inits=(6.0, -6.0, -6.0, -6.0)),
        act_quantizer=BayesianBitsQuantizer(gamma_inits=(-6.0, -6.0, -6.0, -6.0)),
    )
    x = torch.randn(2, 3, 8, 8)
    for q in (layer.weight_quantizer, layer.act_quantizer):
        q.calibrating = "q"
    with torch.no_grad():
        layer(x)
    for q in (layer.weight_quantizer, layer.act_quantizer):
        q.calibrating = None
    assert layer.weight_quantizer.is_signed and not layer.act_quantizer.is_signed
    layer.eval()
    y = layer(x)
    step = layer.act_quantizer.x_max.item() / 3  # unsigned 2-bit grid: 4 levels
    levels = torch.unique(torch.round(y / step))
    assert set(levels.tolist()) <= {0.0, 1.0, 2.0, 3.0}
    torch.testing.assert_close(y, torch.round(y / step) * step)
