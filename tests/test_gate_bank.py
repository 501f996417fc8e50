"""The gate bank against the per-quantizer gate code it replaced (values pinned in tests/data/gate_pins.json), its
one-row fallback, checkpoints written before it, and the number of ops a step costs."""

from __future__ import annotations

import json

import pytest
import torch

import bayesian_bits as bb
from bayesian_bits import gate_bank
from tests import gate_pins

PINNED = json.loads(gate_pins.PINS.read_text())


def _close(got, want, rel: float, path: str = "") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            _close(got[k], want[k], rel, f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, rel, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rel, abs=1e-6 * max(1.0, abs(want))), path
    else:
        assert got == want, path


@pytest.mark.parametrize("name", list(gate_pins.MODELS))
def test_bank_gives_the_pinned_per_quantizer_values(name: str) -> None:
    got = gate_pins.values(name)
    want = PINNED[name]
    # Sums over quantizers and channels now run in another order: float32 rounding, no more.
    for key in ("quantizers", "regularizer", "expected_bops", "relative_bops", "responsive_share", "eval_logits",
                "train_logits"):
        _close(got[key], want[key], rel=2e-5, path=key)
    # The bank takes q4·q8·… as exp(cumsum(log σ)), whose gradient keeps 1 − q where the old cumprod's σ(1 − σ) lost
    # it to cancellation (1 − q ≈ 5e-4 at gamma 6: up to 3e-4 relative error in the pins, checked against float64).
    for key in ("regularizer_grads", "expected_bops_grads", "train_grads"):
        _close(got[key], want[key], rel=1e-3, path=key)


def test_one_bank_per_prepared_model_and_views_write_through() -> None:
    model = bb.build_model("lenet5quantized", bb.QuantConfig(include_pruning=True))
    found = [q for _, q in bb.quantizers(model)]
    assert gate_bank.banks(model) == [model.bb_gates]
    assert [q.row for q in found] == list(range(len(found)))
    assert all(q.bank is model.bb_gates and "gate_bank" not in q._modules for q in found)
    q = found[2]
    with torch.no_grad():
        q.gamma_8.fill_(-5.0)
        q.gamma_2[:3] = -4.0
    assert q.bit_width() == 4 and int(q.keep_mask().sum()) == q.gamma_2.numel() - 3
    assert model.bb_gates.levels(2)[1] == -5.0


def test_a_quantizer_called_outside_the_model_forward_computes_its_own_row() -> None:
    torch.manual_seed(0)
    model = bb.build_model("lenet5quantized", bb.QuantConfig(6, 6, -1.5, -6, include_pruning=True))
    bb.calibrate(model, torch.rand(2, 1, 28, 28))
    q = model.get_submodule("features.2.weight_quantizer")
    model(torch.rand(2, 1, 28, 28))
    assert model.bb_gates._step is None  # the graph's last node ends the step
    torch.manual_seed(3)
    levels, channels = q.bank.row_gates(q.row)
    torch.manual_seed(3)
    flat = torch.cat([q.gammas, q.gamma_2]).detach()
    expect = bb.gates.sample(flat)
    assert torch.equal(channels, expect[4:])
    assert torch.equal(levels, expect[:4] * torch.tensor([1.0, 1.0, 1.0, 0.0]))  # gamma_32 ≤ −2 is skipped


def test_checkpoint_from_before_the_bank_loads() -> None:
    model = bb.build_model("lenet5quantized", bb.QuantConfig(include_pruning=True))
    bb.calibrate(model, torch.rand(2, 1, 28, 28))
    with torch.no_grad():
        model.bb_gates.gamma_logits.uniform_(-3, 6)
        model.bb_gates.alive[1, 2:] = False
    state = model.state_dict()
    old = {k: v for k, v in state.items() if not k.startswith("bb_gates.")}  # the per-quantizer layout of before
    for name, q in bb.quantizers(model):
        for k, bits in enumerate((4, 8, 16, 32)):
            old[f"{name}.gamma_{bits}"] = q.gammas[k:k + 1].detach().clone()
        if q.gamma_2 is not None:
            old[f"{name}.gamma_2"] = q.gamma_2.detach().clone()
        old[f"{name}.alive"] = q.alive.clone()
    fresh = bb.build_model("lenet5quantized", bb.QuantConfig(include_pruning=True))
    fresh.load_state_dict(old)
    assert torch.equal(fresh.bb_gates.gamma_logits, model.bb_gates.gamma_logits)
    assert torch.equal(fresh.bb_gates.alive, model.bb_gates.alive)
    again = bb.build_model("lenet5quantized", bb.QuantConfig(include_pruning=True))
    again.load_state_dict(state)  # and the bank's own layout
    assert torch.equal(again.bb_gates.gamma_logits, model.bb_gates.gamma_logits)


def test_fine_tuning_conversion_removes_the_bank() -> None:
    model = bb.build_model("lenet5quantized", bb.QuantConfig(include_pruning=True))
    bb.calibrate(model, torch.rand(2, 1, 28, 28))
    bb.convert_to_fixed(model)
    assert not hasattr(model, "bb_gates") and not any("gamma_" in k for k in model.state_dict())
    assert torch.isfinite(model(torch.rand(2, 1, 28, 28))).all()
