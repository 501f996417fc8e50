"""BOP budgets: expected BOPs against the report, the projection onto a target, the dual ascent on μ (SPEC A9)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import bayesian_bits as bb
from bayesian_bits import bops, gates
from bayesian_bits.budget import DOWN_GAIN, MU_RANGE, BopBudget
from bayesian_bits.cli import main
from bayesian_bits.pipeline.metrics import read_metrics
from bayesian_bits.projection import Option, Switch, gate_saliency, minimum_bops, project, project_model

SHAPES = {"lenet5quantized": (2, 1, 28, 28), "resnet18": (2, 3, 64, 64), "mobilenetv2": (2, 3, 64, 64)}


def model_with_random_gates(name: str, seed: int, level_range: tuple[float, float] = (-3.0, 3.0),
                            deterministic: bool = False) -> torch.nn.Module:
    """A calibrated model whose gate logits are random (or ±1000: every gate probability 0 or 1)."""
    torch.manual_seed(seed)
    model = bb.build_model(name, bb.QuantConfig(6, 6, 6, -6, include_pruning=True, reg_type="bop"))
    bb.calibrate(model, torch.rand(SHAPES[name]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in model.modules():
            if isinstance(q, bb.BayesianBitsQuantizer):
                for g in (q.gamma_4, q.gamma_8, q.gamma_16, q.gamma_32, q.gamma_2):
                    if g is None:
                        continue
                    if deterministic:
                        g.copy_(torch.where(torch.rand(g.shape, generator=gen) < 0.7, 1000.0, -1000.0))
                    else:
                        g.uniform_(*level_range, generator=gen)
    return model


@pytest.mark.parametrize("name", list(SHAPES))
def test_expected_bops_equal_the_report_on_deterministic_gates(name: str) -> None:
    model = model_with_random_gates(name, seed=3, deterministic=True)
    report = bb.bop_report(model)
    assert 0 < report["relative_bops"] < 25
    assert float(bops.expected_relative_bops(model).detach()) == pytest.approx(report["relative_bops"], rel=1e-6)
    assert float(bops.expected_bops(model).detach()) == pytest.approx(report["gbops"] * 1e9, rel=1e-6)


@pytest.mark.parametrize("name", list(SHAPES))
def test_projection_never_leaves_the_model_over_budget(name: str) -> None:
    for seed, factor in ((0, 0.3), (1, 0.8), (2, 1.6)):
        model = model_with_random_gates(name, seed)
        before = bb.bop_report(model)["relative_bops"]
        target = factor * before
        x, y = torch.rand(SHAPES[name]), torch.randint(0, 10, (SHAPES[name][0],))
        result = BopBudget(model, target_rel_bops=target).project([(x, y)])
        after = bb.bop_report(model)["relative_bops"]
        assert after <= target
        assert result.after == pytest.approx(after / 100 * bops.baseline_bops(model))
        if factor < 1:  # switched off until under, then filled back: within the band
            assert after >= 0.9 * target and result.switched_off
        else:
            assert result.switched_on and not result.switched_off and after > before


def test_projected_switches_are_eval_gates_and_keep_a_channel_per_layer() -> None:
    model = model_with_random_gates("lenet5quantized", seed=4)
    floor = minimum_bops(model)
    project_model(model, floor * 1.0001)
    for q in model.modules():
        if isinstance(q, bb.BayesianBitsQuantizer) and q.gamma_2 is not None:
            assert q.keep_mask().sum() >= 1
    assert bops.term_bops(model, bops.EVAL)  # still a model the report can read
    with pytest.raises(ValueError, match="raise the target"):
        project_model(model, floor * 0.5)


def test_saliency_covers_every_gate_and_is_zero_above_the_first_off_level() -> None:
    model = model_with_random_gates("lenet5quantized", seed=5, level_range=(4.0, 6.0))
    q = model.get_submodule("features.2.weight_quantizer")
    with torch.no_grad():
        q.gamma_16.fill_(-3.0)  # 8 bits: levels 4 and 8 on, 16 and 32 off
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    saliency = gate_saliency(model, [(x, y), (x, y)])
    assert saliency[Switch("features.2.weight_quantizer", level=1)] > 0
    assert saliency[Switch("features.2.weight_quantizer", level=2)] == 0.0
    assert saliency[Switch("features.2.weight_quantizer", level=3)] == 0.0
    assert sum(1 for s in saliency if s.quantizer == "features.2.weight_quantizer" and s.channel is not None) == 64
    assert all(v >= 0 for v in saliency.values())
    assert q.bank.pinned is None  # the probe's eval gates are released


@dataclass
class FakeBoard:
    """Independent switches with additive BOPs (the `Board` interface, no model)."""

    base: float
    items: dict[str, tuple[float, float]]  # name -> (BOPs when on, estimated loss)
    state: dict[str, bool]
    flips: list[tuple[str, bool]] = field(default_factory=list)
    refreshed: int = 0

    def total(self) -> float:
        return self.base + sum(b for k, (b, _) in self.items.items() if self.state[k])

    def options(self) -> list[Option]:
        return [Option(Switch(k), self.state[k], b, loss, group=k) for k, (b, loss) in self.items.items()]

    def flip(self, switches: list[Switch], on: bool) -> None:
        for s in switches:
            self.flips.append((s.quantizer, on))
            self.state[s.quantizer] = on

    def undo(self, switches: list[Switch]) -> None:
        for s in switches:
            self.state[s.quantizer] = not self.state[s.quantizer]

    def refresh(self) -> None:
        self.refreshed += 1


def test_project_switches_off_the_cheapest_loss_per_bop_first() -> None:
    items = {"big_cheap": (50.0, 1.0), "big_costly": (50.0, 100.0), "small": (5.0, 0.01), "tiny": (1.0, 0.5)}
    board = FakeBoard(10.0, items, dict.fromkeys(items, True))
    result = project(board, 70.0)
    # loss/BOP: small 0.002, big_cheap 0.02, tiny 0.5, big_costly 2: small then big_cheap cover the 46 excess.
    assert [s.quantizer for s in result.switched_off] == ["small", "big_cheap"]
    # That leaves 61, under 0.9 x 70 = 63, so the most useful off-switch that fits comes back: small (5 BOPs).
    assert [s.quantizer for s in result.switched_on] == ["small"] and board.total() == result.after == 66.0


def test_project_fills_back_only_while_under_and_raises_when_infeasible() -> None:
    items = {"a": (30.0, 3.0), "b": (8.0, 2.0), "c": (3.0, 0.0)}
    board = FakeBoard(10.0, items, dict.fromkeys(items, False))
    result = project(board, 22.0)
    assert [s.quantizer for s in result.switched_on] == ["b", "c"] and result.after == 21.0 <= 22.0
    with pytest.raises(ValueError, match="raise the target"):
        project(FakeBoard(10.0, items, dict.fromkeys(items, True)), 9.0)


def test_budget_mu_rises_over_target_falls_under_and_is_deterministic() -> None:
    def run(target: float) -> list[float]:
        model = model_with_random_gates("lenet5quantized", seed=6, level_range=(5.0, 6.0))
        budget = BopBudget(model, target_rel_bops=target, mu=0.1, step_size=0.05)
        mus = []
        for _ in range(5):
            budget.step()
            mus.append(float(budget.mu))
        return mus

    over, under = run(0.5), run(50.0)
    share = 1.0 - float(gates.prob_one(torch.tensor(5.0)))  # the most any acting logit in [5, 6] gives
    assert 0.1 < over[0] <= 0.1 * math.exp(0.05 * share) and over == sorted(over)  # violation clipped to +1
    assert under == sorted(under, reverse=True) and under[-1] < 0.1
    assert run(0.5) == over  # same gates, same μ, bit for bit


def set_acting_logits(model: torch.nn.Module, value: float) -> None:
    """gamma_4, gamma_8 and every pruning logit to `value`; gamma_16 and gamma_32 skipped (−6), so not acting."""
    with torch.no_grad():
        for q in model.modules():
            if isinstance(q, bb.BayesianBitsQuantizer):
                for g, v in ((q.gamma_4, value), (q.gamma_8, value), (q.gamma_16, -6.0), (q.gamma_32, -6.0),
                             (q.gamma_2, value)):
                    if g is not None:
                        g.fill_(v)


@pytest.mark.parametrize("value", [6.0, 2.0, 0.0, -1.5])
def test_responsive_share_counts_acting_logits_not_pinned_at_one(value: float) -> None:
    model = model_with_random_gates("lenet5quantized", seed=6)
    set_acting_logits(model, value)
    floor = 100.0 * minimum_bops(model) / bops.baseline_bops(model)
    budget = BopBudget(model, target_rel_bops=1.01 * floor, step_size=0.05)
    assert float(bops.expected_bops(model).detach()) > 2.0 * budget.target_bops
    share = float(budget.responsive_share())
    pinned = 1.0 / (1.0 + math.exp(-(value + gates.OFFSET)))  # P(z = 1): the stretched sample clamped at 1
    assert share == pytest.approx(1.0 - pinned, rel=1e-4)  # float32; the skipped gamma_16/32 (share ≈ 1) are left out
    mu = float(budget.mu)
    budget.step()  # far over the target: the violation is clipped to +1, μ rises by step_size · share in log
    assert math.log(float(budget.mu) / mu) == pytest.approx(0.05 * share, rel=1e-4)


def test_responsive_share_of_the_deterministic_fixed_gate() -> None:
    model = model_with_random_gates("lenet5quantized", seed=6)
    model.bb_gates.method = "fixed"
    floor = 100.0 * minimum_bops(model) / bops.baseline_bops(model)
    for value, share in ((6.0, 0.0), (1.0, 1.0)):  # the hard sigmoid is clamped at 1 iff gamma ≥ β·ln 11 = 1.5986
        set_acting_logits(model, value)
        assert float(BopBudget(model, target_rel_bops=1.01 * floor).responsive_share()) == share


def test_responsive_share_leaves_out_logits_the_forward_ignores() -> None:
    fixed = bb.BayesianBitsQuantizer(4, mode="fixed", fixed_bits=8)
    assert [float(v) for v in fixed.bank.responsive_share()] == [0.0, 0.0]  # regularised, but never sampled
    pruned = bb.BayesianBitsQuantizer(4, mode="fixed", fixed_bits=8, prune_only=True, gamma_inits=(0, 0, 0, 0))
    total, groups = pruned.bank.responsive_share()  # one group: the pruning logits (at 6), not the levels (at 0)
    assert float(groups) == 1 and float(total) == pytest.approx(1.0 - float(gates.prob_one(torch.tensor(6.0))))
    gated = bb.BayesianBitsQuantizer(None, gamma_inits=(0.0, -6.0, 0.0, 0.0))
    total, groups = gated.bank.responsive_share()  # gamma_8 ≤ −2 ends the chain: only gamma_4 acts
    assert float(groups) == 1 and float(total) == pytest.approx(1.0 - float(gates.prob_one(torch.tensor(0.0))))


def test_budget_mu_falls_four_times_faster_than_it_rises() -> None:
    model = model_with_random_gates("lenet5quantized", seed=6, level_range=(5.0, 6.0))
    start = float(bops.expected_relative_bops(model).detach())
    budget = BopBudget(model, target_rel_bops=2.0 * start, mu=0.1, step_size=0.05)
    budget.step()  # gates unchanged: the violation is E / T − 1 = −0.5 exactly
    assert float(budget.mu) == pytest.approx(0.1 * math.exp(-0.05 * DOWN_GAIN * 0.5), rel=1e-6)


def shift_levels(model: torch.nn.Module, delta: float) -> None:
    with torch.no_grad():
        for q in model.modules():
            if isinstance(q, bb.BayesianBitsQuantizer):
                for g in (q.gamma_4, q.gamma_8, q.gamma_16, q.gamma_32):
                    g.add_(delta)


def test_budget_predicts_the_violation_from_the_trend() -> None:
    """Over the target but falling fast towards it: with a horizon μ already falls; without one it keeps rising."""

    def mus(horizon: int) -> list[float]:
        model = model_with_random_gates("lenet5quantized", seed=6, level_range=(1.0, 2.0))
        start = float(bops.expected_relative_bops(model).detach())
        budget = BopBudget(model, target_rel_bops=0.5 * start, mu=0.1, step_size=0.05, horizon_steps=horizon)
        out = []
        for _ in range(30):
            shift_levels(model, -0.02)  # E[BOPs] falls a little at every step, staying over the target
            budget.step()
            out.append(float(budget.mu))
        assert float(bops.expected_relative_bops(model).detach()) > 0.5 * start
        return out

    assert mus(0) == sorted(mus(0)) and mus(0)[-1] > 0.1
    ahead = mus(1000)
    assert ahead[-1] < ahead[0] < 0.1 * math.exp(0.05)


def test_budget_ramp_state_and_bounds() -> None:
    model = model_with_random_gates("lenet5quantized", seed=7, level_range=(5.0, 6.0))
    budget = BopBudget(model, target_gbops=0.01, mu=MU_RANGE[1], step_size=10.0, ramp_steps=4)
    assert budget.target_bops == 1e7 and budget.reference() == pytest.approx(budget.start_bops)
    shift_levels(model, 0.5)
    budget.step()
    assert float(budget.mu) == pytest.approx(MU_RANGE[1])  # clamped
    assert budget.start_bops > budget.reference() > budget.target_bops
    state = budget.state_dict()
    other = BopBudget(model, target_gbops=0.01, step_size=10.0, ramp_steps=4)
    other.load_state_dict(state)
    assert other.state_dict() == state and other.reference() == budget.reference()
    assert state["rate"] != 0.0  # the trend is kept (E[BOPs] changed between construction and the step)
    old = {k: state[k] for k in ("log_mu", "steps", "start_bops")}  # a checkpoint from before the trend was kept
    other.load_state_dict(old)
    assert other.state_dict()["rate"] == 0.0 and other.state_dict()["log_mu"] == state["log_mu"]
    status = budget.status()
    assert set(status) == {"target_rel_bops", "expected_rel_bops", "eval_rel_bops", "mu"}
    assert status["eval_rel_bops"] == pytest.approx(bb.bop_report(model)["relative_bops"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "exactly one of"),
    ({"target_rel_bops": 1.0, "target_gbops": 1.0}, "exactly one of"),
    ({"target_rel_bops": -1.0}, "target_rel_bops must be a positive"),
    ({"target_gbops": float("nan")}, "target_gbops must be a positive"),
    ({"target_rel_bops": 1.0, "mu": 0.0}, "mu"),
    ({"target_rel_bops": 1.0, "step_size": 0.0}, "step_size"),
    ({"target_rel_bops": 1.0, "ramp_steps": -1}, "ramp_steps"),
    ({"target_rel_bops": 1.0, "horizon_steps": -1}, "horizon_steps"),
    ({"target_rel_bops": 1.0, "switch_steps": -1}, "switch_steps"),
    ({"target_rel_bops": 1e-6}, "below the smallest model"),
])
def test_budget_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    model = model_with_random_gates("lenet5quantized", seed=8)
    with pytest.raises(ValueError, match=message):
        BopBudget(model, **kwargs)


def test_switching_points_keep_the_eval_model_on_the_reference() -> None:
    model = model_with_random_gates("lenet5quantized", seed=9, level_range=(5.0, 6.0))
    budget = BopBudget(model, target_rel_bops=0.5, ramp_steps=8, switch_steps=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    cuts = 0
    for _ in range(12):
        x, y = torch.rand(SHAPES["lenet5quantized"], generator=gen), torch.randint(0, 10, (2,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y) + budget.mu * bb.regularizer(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        budget.step()
        assert budget.switch_due == (budget.steps % 2 == 0)
        if budget.switch_due:
            result = budget.switch([(x, y)])
            cuts += bool(result.switched_off)
            assert not result.switched_on
            assert bops.baseline_bops(model) * bb.bop_report(model)["relative_bops"] / 100 <= budget.reference()
    assert cuts >= 3  # the reference falls from about 6 % to 0.5 % over 8 steps: the gates alone do not follow
    budget.project([(x, y)])
    assert bb.bop_report(model)["relative_bops"] <= 0.5


def test_switching_points_leave_skipped_and_fixed_quantizers_alone() -> None:
    torch.manual_seed(0)
    config = bb.QuantConfig(6, 6, 6, -6, include_pruning=True, reg_type="bop")
    model = bb.build_model("lenet5quantized", config, skip=["features.0"],
                           overrides={"classifier.0": {"weight_bits": 8}})
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    bb.calibrate(model, x[:2])
    fixed = {n: q for n, q in bb.quantizers(model) if q.mode is bb.Mode.FIXED}
    assert set(fixed) == {"classifier.0.weight_quantizer"}
    before = {n: q.gammas.detach().clone() for n, q in fixed.items()}
    budget = BopBudget(model, target_rel_bops=3.0, ramp_steps=2, switch_steps=1)
    for _ in range(2):
        budget.step()
        budget.switch([(x, y)])
    switched = {s.quantizer for s in budget.project([(x, y)]).switched_off}
    assert all(torch.equal(q.gammas, before[n]) for n, q in fixed.items())
    assert not any(n.startswith("features.0.") for n, _ in bb.quantizers(model))  # skipped: no quantizer at all
    assert not switched & set(fixed)
    rows = {r["name"]: r for r in bb.bop_report(model)["layers"]}
    assert rows["classifier.0"]["weight_bits"] == 8 and rows["features.0"]["weight_bits"] == "float"


SMOKE = ["--experiment", "mnist", "--model", "lenet5quantized", "--synthetic", "32", "--batch-size", "8",
         "--optimizer", "Adam", "--learning-rate", "1e-3", "--learning-rate-q", "1e-3", "--learning-rate-s", "1e-3",
         "--reg-type", "bop", "--include-pruning", "--learned-scale", "range", "--n-workers", "0",
         "--gamma-16-init", "-6", "--gamma-32-init", "-6"]


@pytest.mark.parametrize("finetune", ["0", "1"])
def test_a_short_run_with_a_target_ends_within_the_band(tmp_path: Path, finetune: str) -> None:
    logdir = tmp_path / "run"
    code = main(["train", "--data-dir", str(tmp_path / "data"), *SMOKE, "--epochs", "2", "--max-batches", "2",
                 "--target-rel-bops", "1.0", "--fixed-gate-finetune-epochs", finetune, "--logdir", str(logdir)])
    assert code == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["target_rel_bops"] == pytest.approx(1.0)
    assert 0.9 <= summary["relative_bops"] <= 1.0
    records = read_metrics(logdir)
    trained = [r for r in records if r["phase"] == "train"]
    switches = [r for r in records if r["phase"] == "switch"]
    assert len(trained) == 2 and all(r["target_rel_bops"] == pytest.approx(1.0) for r in trained)
    # μ rises while E[BOPs] is over the reference, and falls once the cuts have taken E[BOPs] under it
    assert trained[0]["mu"] > 0.1 > trained[1]["mu"]
    # a switching point after every step (4 steps, the ramp over the first 2): the eval model on the reference
    assert [r["epoch"] for r in switches] == [0.5, 1.0, 1.5, 2.0]
    assert switches[0]["before_rel_bops"] == pytest.approx(6.25) and switches[0]["switched_off"]
    assert switches[0]["reference_rel_bops"] == pytest.approx(2.5, rel=1e-2)  # E[BOPs] 6.23 × (1 / 6.23)^(1/2)
    assert all(r["after_rel_bops"] <= r["reference_rel_bops"] for r in switches)
    assert all(r["expected_rel_bops"] > 1.0 and r["eval_rel_bops"] <= 1.0 for r in trained)
    assert summary["projection"]["before_rel_bops"] <= 1.0
    assert (logdir / "budget.png").is_file()


@pytest.mark.parametrize(("flags", "message"), [
    (["--target-rel-bops", "1", "--target-gbops", "0.1"], "pass one of them"),
    (["--target-rel-bops", "0"], "--target-rel-bops must be a positive number"),
    (["--target-gbops", "1", "--reg-type", "const"], "add --reg-type bop"),
    (["--target-rel-bops", "1e-5"], "below the smallest model"),
])
def test_budget_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str],
                                  message: str) -> None:
    assert main(["train", "--data-dir", str(tmp_path / "data"), *SMOKE, "--epochs", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
