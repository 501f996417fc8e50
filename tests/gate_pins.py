"""Pinned gate-side values of the paper models: what the per-quantizer gate code computed before the gate bank.

`values(name)` builds a paper model, sets its gate logits and ratchet to seeded values, and returns the eval gates,
bit widths, expected bits and keep shares, the regulariser, expected and eval BOPs, the budget's responsive share,
the gradients of the regulariser and of a training loss (deterministic 'fixed' gates, BN frozen) with respect to every
gate logit and range, and the model's outputs. `python -m tests.gate_pins` rewrote tests/data/gate_pins.json from the
code before the gate bank (commit it once; test_gate_bank.py compares the bank against it). The eval outputs
("eval_logits") were pinned again when evaluation moved to the deployed arithmetic (issue 24: one grid step instead
of the summed residual levels, the clip alone at 32 bits).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import bayesian_bits as bb

PINS = Path(__file__).with_name("data") / "gate_pins.json"
MODELS = {  # name: gamma inits of the reference README (§9)
    "lenet5quantized": (6.0, 6.0, -6.0, -6.0),
    "vggquantized": (6.0, 6.0, 6.0, 6.0),
    "resnet18": (6.0, 6.0, 6.0, -6.0),
    "mobilenetv2": (6.0, 6.0, 6.0, -6.0),
}
IMAGE_SIZE = {"resnet18": 64, "mobilenetv2": 64}  # smaller than the paper's 224² to keep the test quick


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, list[float]]:
    """d loss / d (every gate logit and range) per quantizer: [dγ4..dγ32, Σ dγ2, Σ dγ2·w, dx_max] with w a fixed
    ramp over the channels."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and ("gamma_" in n or "x_max" in n)]
    params = dict(model.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True), strict=True))
    out = {}
    for path, q in bb.quantizers(model):
        if not isinstance(q, bb.BayesianBitsQuantizer):
            continue
        levels, channels, x_max = level_grads(q, path, grads), channel_grads(q, path, grads), grads.get(
            f"{path}.x_max")
        ramp = None if channels is None else torch.linspace(-1.0, 1.0, channels.numel())
        out[path] = [*levels.tolist(),
                     0.0 if channels is None else float(channels.sum()),
                     0.0 if channels is None else float((channels * ramp).sum()),
                     0.0 if x_max is None else float(x_max.sum())]
    return out


def level_grads(q, path: str, grads: dict) -> torch.Tensor:
    """The gradient of the quantizer's four level logits."""
    if hasattr(q, "bank"):
        return q.bank.level_rows(grads["bb_gates.gamma_logits"])[q.row]
    return torch.cat([grads[f"{path}.gamma_{b}"] if grads[f"{path}.gamma_{b}"] is not None else torch.zeros(1)
                      for b in (4, 8, 16, 32)])


def channel_grads(q, path: str, grads: dict) -> torch.Tensor | None:
    """The gradient of the quantizer's pruning logits, or None without pruning."""
    if q.gamma_2 is None:
        return None
    if hasattr(q, "bank"):
        return q.bank.channel_rows(grads["bb_gates.gamma_logits"])[q.row]
    return grads[f"{path}.gamma_2"]


@torch.no_grad()
def _set_logits(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, q in bb.quantizers(model):
        if not isinstance(q, bb.BayesianBitsQuantizer):
            continue
        levels = torch.rand(4, generator=gen) * 10 - 3
        if hasattr(q, "bank"):
            q.gammas.copy_(levels)
        else:
            for b, v in zip((4, 8, 16, 32), levels.tolist(), strict=True):
                getattr(q, f"gamma_{b}").fill_(v)
        q.alive.copy_(torch.rand(4, generator=gen) > 0.15)
        if q.gamma_2 is not None:
            q.gamma_2.copy_(torch.rand(q.gamma_2.numel(), generator=gen) * 10 - 3)


@torch.no_grad()
def _round_state(model: torch.nn.Module) -> None:
    """Ranges rounded to 2 significant digits and seeded BN running statistics: what the calibration forward computed
    in the last bits (its BN statistics are a kernel's) then decides nothing downstream."""
    gen = torch.Generator().manual_seed(3)
    for name, t in model.state_dict().items():
        if name.endswith("x_max"):
            digits = 10.0 ** (1 - torch.floor(torch.log10(t.abs().clamp(min=1e-30))))
            t.copy_(torch.round(t * digits) / digits)
        elif name.endswith("running_mean"):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
        elif name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)


def _model(name: str, method: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The paper model with gating `method`, calibrated with deterministic ('fixed') gates so that no random draw
    decides its ranges, then given seeded gate logits."""
    spec = bb.MODELS[name]
    shape = (spec.input_shape[0], IMAGE_SIZE.get(name, spec.input_shape[1]), IMAGE_SIZE.get(name, spec.input_shape[2]))
    images = torch.rand(4, *shape, generator=torch.Generator().manual_seed(1))
    models = {}
    for m in dict.fromkeys(("fixed", method)):
        torch.manual_seed(0)
        config = bb.QuantConfig(*MODELS[name], include_pruning=True, reg_type="bop", gating_method=m)
        models[m] = bb.build_model(name, config, num_classes=10, input_shape=shape)
    bb.calibrate(models["fixed"], images[:2])
    _round_state(models["fixed"])
    model = models[method]
    model.load_state_dict(models["fixed"].state_dict())
    bb.assign_macs(model)
    _set_logits(model, seed=2)
    return model, images


def values(name: str) -> dict:
    """The pinned quantities of paper model `name` (JSON-able)."""
    model, images = _model(name, "l0")
    labels = torch.arange(images.shape[0]) % 10
    out: dict = {}
    model.eval()
    with torch.no_grad():
        out["eval_logits"] = model(images).double().sum(1).tolist()
    out["quantizers"] = {
        n: {"bits": q.bit_width(), "expected_bits": float(q.expected_bits().detach()),
            "level_gates": q.level_gates().tolist(),
            "kept": None if q.keep_mask() is None else float(q.keep_mask().sum())}
        for n, q in bb.quantizers(model) if isinstance(q, bb.BayesianBitsQuantizer)}
    reg = bb.regularizer(model)
    out["regularizer"] = float(reg)
    out["regularizer_grads"] = _grads(model, reg)
    expected = bb.expected_bops(model)
    out["expected_bops"] = float(expected)
    out["expected_bops_grads"] = _grads(model, expected)
    out["relative_bops"] = bb.bop_report(model)["relative_bops"]
    budget = bb.BopBudget(model, target_rel_bops=out["relative_bops"] / 2)
    out["responsive_share"] = float(budget.responsive_share())
    fixed, _ = _model(name, "fixed")
    bb.freeze_batch_norm(fixed)  # the gates' training path; BN's batch statistics are the fold kernels' to test
    fixed.train()
    logits = fixed(images)
    loss = F.cross_entropy(logits, labels)
    out["train_logits"] = logits.double().sum(1).tolist()
    out["train_grads"] = _grads(fixed, loss)
    return out


if __name__ == "__main__":
    PINS.parent.mkdir(exist_ok=True)
    PINS.write_text(json.dumps({name: values(name) for name in MODELS}, indent=1) + "\n")
    print(f"wrote {PINS}")
