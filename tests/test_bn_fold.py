"""The two BN folds of training (A13): the fast fold against a float64 autograd evaluation of its formula, the same
values in a model's step (fold bank, gate bank) as for a layer on its own, γ = 0 and constant channels, eval equal for
both folds, and --bn-fold through checkpoints and --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayesian_bits as bb
from bayesian_bits import gates
from bayesian_bits.cli import main
from bayesian_bits.fold_bank import SAFE_GAMMA
from bbkernels import reference
from tests.test_pipeline_runs import MODEL_RUNS, _interrupt_after, final_weights, train


def _layer(bn_fold: str, gamma: torch.Tensor) -> tuple[bb.QuantConv2d, torch.Tensor]:
    """A calibrated conv + BN + ReLU layer with a gated, pruned 4-bit weight quantizer (deterministic 'fixed' gates)."""
    torch.manual_seed(0)
    channels = gamma.numel()
    layer = bb.QuantConv2d(3, channels, 3, padding=1, bias=False, bn=nn.BatchNorm2d(channels), activation=nn.ReLU(),
                           weight_quantizer=bb.BayesianBitsQuantizer(channels, gamma_inits=(1.0, -3.0, -3.0, -3.0),
                                                                     gating_method="fixed"),
                           bn_fold=bn_fold)
    with torch.no_grad():
        layer.bn.weight.copy_(gamma)
        layer.bn.bias.copy_(torch.linspace(-0.5, 0.5, channels))
        layer.bn.running_mean.copy_(torch.linspace(-0.2, 0.3, channels))
        layer.bn.running_var.copy_(torch.linspace(0.5, 1.5, channels))
        layer.weight_quantizer.gamma_2.copy_(torch.linspace(-1.0, 3.0, channels))
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    layer.weight_quantizer.calibrating = "w"  # as `calibrate` does: one forward in training mode
    with torch.no_grad():
        layer.train()(x)
    layer.weight_quantizer.calibrating = None
    with torch.no_grad():  # undo that forward's running-statistics update
        layer.bn.running_mean.copy_(torch.linspace(-0.2, 0.3, channels))
        layer.bn.running_var.copy_(torch.linspace(0.5, 1.5, channels))
    return layer, x


def _float64_fast(layer: bb.QuantConv2d, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fast fold's formula by float64 autograd: BN_train(conv(x, (g2/s)·Q(W·s))), s = safe(γ)/σ_run a constant,
    Q the reference quantizer in float64 with the layer's 'fixed' training gates."""
    q, bn = layer.weight_quantizer, layer.bn
    leaves = {"x": x, "weight": layer.weight, "gamma": bn.weight, "beta": bn.bias, "x_max": q.x_max,
              "logits": q.bank.gamma_logits}
    v = {k: t.detach().double().requires_grad_() for k, t in leaves.items()}
    levels, channels = v["logits"][:4], v["logits"][4:]
    g = gates.hard_sigmoid(levels) * torch.cumprod((levels.detach() > gates.SKIP_BELOW).double(), 0)
    g2 = gates.hard_sigmoid(channels)
    std_run = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = v["gamma"].detach()
    s = torch.copysign(gamma.abs().clamp(min=SAFE_GAMMA), gamma) / std_run
    folded = v["weight"] * s.reshape(-1, 1, 1, 1)
    wq = reference.bb_quantize(folded, v["x_max"], g, g2 / s, signed=True, compute_dtype=torch.float64)
    z = F.conv2d(v["x"], wq, None, 1, 1)
    out = torch.relu(F.batch_norm(z, bn.running_mean.double().clone(), bn.running_var.double().clone(), v["gamma"],
                                  v["beta"], True, bn.momentum, bn.eps))
    probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out * probe).sum().backward()
    return out.detach(), {k: t.grad for k, t in v.items()}


def test_fast_fold_against_its_float64_formula() -> None:
    layer, x = _layer("fast", torch.tensor([1.0, -0.7, 0.004, 0.0, 2.5, 0.3]))  # two |γ| under SAFE_GAMMA
    want, grads = _float64_fast(layer, x)  # before the layer's forward moves the running statistics
    x = x.clone().requires_grad_()
    out = layer(x)
    probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).float()
    (out * probe).sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    got = {"x": x.grad, "weight": layer.weight.grad, "gamma": layer.bn.weight.grad, "beta": layer.bn.bias.grad,
           "x_max": layer.weight_quantizer.x_max.grad, "logits": layer.weight_quantizer.bank.gamma_logits.grad}
    for name, g in got.items():
        torch.testing.assert_close(g.double(), grads[name], rtol=1e-4, atol=1e-5, msg=name)


def _cnn(bn_fold: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 16, 10))
    x = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    config = bb.QuantConfig(6.0, 6.0, -6.0, -6.0, include_pruning=True, gating_method="fixed", bn_fold=bn_fold)
    prepared = bb.prepare(model, x[:1], config)
    bb.calibrate(prepared, x[:2])
    return prepared, x


@pytest.mark.parametrize("bn_fold", ["exact", "fast"])
def test_a_models_step_equals_its_layers_on_their_own(bn_fold: str) -> None:
    """The fold and gate banks' per-step values (one flat computation for all layers) against each layer computing
    its own: the same outputs, gradients and running statistics."""
    results = []
    for banks in (True, False):
        model, x = _cnn(bn_fold)
        if not banks:  # every layer and quantizer on its own: no step values
            model.bb_gates.begin = model.bb_gates.end = lambda: None
        out = model(x)
        out.square().sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()},
                        {n: b.clone() for n, b in model.named_buffers() if "running" in n}))
    (out_a, grads_a, stats_a), (out_b, grads_b, stats_b) = results
    torch.testing.assert_close(out_a, out_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in stats_a:
        torch.testing.assert_close(stats_a[name], stats_b[name], msg=name)


@pytest.mark.parametrize("bn_fold", ["exact", "fast"])
def test_zero_gamma_and_a_constant_channel_stay_finite(bn_fold: str) -> None:
    layer, x = _layer(bn_fold, torch.tensor([0.0, 1.0, 0.0, -0.5]))
    x = x.clone()
    x[:, 1] = 0.25  # a constant input channel
    with torch.no_grad():
        layer.weight[2].zero_()  # and an output channel with no input: a constant conv output, variance 0
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    grads = [layer.weight.grad, layer.bn.weight.grad, layer.bn.bias.grad, layer.weight_quantizer.x_max.grad]
    assert all(torch.isfinite(g).all() for g in grads)


def test_a_zero_initialised_layer_learns_its_gamma_under_the_fast_fold() -> None:
    """γ = 0 everywhere (zero_init_residual): the fold uses ±SAFE_GAMMA, calibration ranges the weight at that scale,
    and the batch statistics γ learns from are the weight's, not zeros."""
    layer, x = _layer("fast", torch.zeros(4))
    with torch.no_grad():
        layer.bn.bias.fill_(0.5)  # the ReLU passes every channel
    out = layer(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
    assert layer.bn.weight.grad.abs().min() > 1e-3


def test_eval_is_the_same_for_both_folds() -> None:
    exact, x = _cnn("exact")
    fast, _ = _cnn("fast")
    fast.load_state_dict(exact.state_dict())
    with torch.no_grad():
        assert torch.equal(exact.eval()(x), fast.eval()(x))


def test_bn_fold_round_trips_through_checkpoints_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    flags = ["--model", "vggquantized", *MODEL_RUNS["vggquantized"], "--batch-size", "2", "--epochs", "2",
             "--optimizer", "Adam", "--learning-rate", "1e-3", "--gating-lambda", "0.01", "--include-pruning",
             "--learned-scale", "range", "--n-workers", "0", "--seed", "3", "--bn-fold", "fast"]
    assert train(tmp_path, *flags, "--logdir", str(tmp_path / "straight")) == 0
    ckpt = torch.load(tmp_path / "straight" / "epoch_FINAL.pth", weights_only=True)
    assert ckpt["options"]["bn_fold"] == "fast"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        assert train(tmp_path, *flags, "--logdir", str(tmp_path / "cut")) == 130
    exact = [f if f != "fast" else "exact" for f in flags]
    assert train(tmp_path, *exact, "--logdir", str(tmp_path / "cut"), "--resume",
                 str(tmp_path / "cut" / "last.pth")) == 2
    assert "--bn-fold 'exact' (checkpoint: 'fast')" in capsys.readouterr().err
    assert train(tmp_path, *flags, "--logdir", str(tmp_path / "cut"), "--resume",
                 str(tmp_path / "cut" / "last.pth")) == 0
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "cut")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert main(["train", "--eval-only", "--checkpoint", str(tmp_path / "straight" / "epoch_FINAL.pth"),
                 "--n-workers", "0", "--logdir", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["top1"] == json.loads((tmp_path / "straight" / "summary.json").read_text())["top1"]


def test_fast_fold_calibration_starts_untrained_running_statistics_at_the_data() -> None:
    """The fast fold scales the weight by γ/σ_run and takes its statistics from the quantized conv: from σ_run = 1,
    far from the data's, the folded weight would land outside its calibrated range and the clipped output drag σ_run
    down with it. Calibration starts an untrained BN's running statistics at the batch's float-weight statistics;
    the exact fold keeps the reference's calibration (one momentum step from mean 0, variance 1)."""
    for bn_fold in ("fast", "exact"):
        model, x = _cnn(bn_fold)
        layer = model.get_submodule("0")
        var, mean = torch.var_mean(F.conv2d(x[:2], layer.weight, None, 1, 1), (0, 2, 3), correction=1)
        if bn_fold == "exact":
            mean, var = 0.1 * mean, 0.9 + 0.1 * var
        # the fast fold's own batch statistics (8-bit weights) then move them by 0.1 of a nearly equal value
        torch.testing.assert_close(layer.bn.running_mean, mean, rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(layer.bn.running_var, var, rtol=2e-2, atol=1e-3)
