"""MAC counting, BOP-weighted regulariser set-up and the BOP report (SPEC B §3.2–3.7, §6.10)."""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import Tensor, nn

from . import gates
from .layers import QuantLayer
from .quantizer import FLOAT_BITS, BayesianBitsQuantizer, FixedQuantizer

INPUT_BITS = 8  # the network input has 8-bit colour values (§3.5)
BASELINE_BITS = 32 * 32  # relative BOPs are against W32A32


def _input_shape(model: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(input_shape)
    shape = getattr(model, "mac_input_shape", None)
    if shape is None:
        raise ValueError(f"{type(model).__name__} has no default MAC input shape; pass input_shape=(1, C, H, W)")
    return shape


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> dict[str, int]:
    """MACs of every conv and linear layer for one forward of `torch.rand(input_shape)` in eval mode (§3.2, §7.2);
    bias adds are not counted. Default shape: the model's `mac_input_shape` (batch 1). Restores the mode."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def count(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                n, c, h, w = output.shape
                macs[name] = n * c * h * w * kh * kw * module.in_channels // module.groups
            else:
                macs[name] = math.prod(output.shape[:-1]) * module.in_features * module.out_features

        return count

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        model(torch.rand(_input_shape(model, input_shape), device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs


def _quantizer_at(model: nn.Module, path: str) -> nn.Module | None:
    """The quantizer at `path`, None where the model has none there (float tensor)."""
    parent, _, attr = path.rpartition(".")
    return getattr(model.get_submodule(parent), attr)


def _bb(module: nn.Module | None) -> BayesianBitsQuantizer | None:
    return module if isinstance(module, BayesianBitsQuantizer) else None


def assign_macs(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> dict[str, int]:
    """Give each Bayesian Bits quantizer its BOP weight MACs / max MACs for reg_type 'bop' (§3.2): a weight
    quantizer its layer's MACs, a grouped activation quantizer the sum over the layers it feeds. Quantizers in
    no group (pre-add tensors) and, in prune-only mode, activation quantizers keep weight 1. Returns the MACs."""
    macs = count_macs(model, input_shape)
    max_macs = max(macs.values())
    prune_only = any(q.prune_only for q in model.modules() if isinstance(q, BayesianBitsQuantizer))
    assigned: set[int] = set()
    for group in model.topology().groups:
        for name in group.layers:
            q = _bb(model.get_submodule(name).weight_quantizer)
            if q is not None:
                if id(q) in assigned:
                    raise RuntimeError(f"weight quantizer of {name} is in two quantizer groups; fix the topology")
                assigned.add(id(q))
                q.bop_weight = macs[name] / max_macs
        act = None if (group.act is None or prune_only) else _bb(_quantizer_at(model, group.act))
        if act is not None:
            act.bop_weight = sum(macs[n] for n in group.layers) / max_macs
    return macs


def _bits(q: nn.Module | None) -> int:
    return FLOAT_BITS if q is None else q.bit_width()


def _mask(q: nn.Module | None) -> Tensor | None:
    return None if q is None else q.keep_mask()


def _mean(mask: Tensor | None) -> float:
    return 1.0 if mask is None else float(mask.float().mean())


def _quantizer_row(name: str, q: BayesianBitsQuantizer | FixedQuantizer) -> dict:
    row = {"name": name, "bits": q.bit_width(), "signed": q._signed, "x_max": float(q.x_max.detach())}
    mask = q.keep_mask()
    row["kept_pct"] = None if mask is None else 100.0 * _mean(mask)
    if isinstance(q, BayesianBitsQuantizer):
        row["x_min"] = float(q.x_min)
        # Printed as plain σ(gamma), as the reference's table does (§6.10).
        row["gates"] = [round(float(v), 5) for v in torch.sigmoid(q.gammas.detach())]
        row["p_off"] = None if q.gamma_2 is None else float(torch.sigmoid(gates.OFFSET - q.gamma_2.detach()).mean())
    return row


@torch.no_grad()
def bop_report(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> dict:
    """Eval bit widths, keep ratios and BOPs relative to W32A32 with an 8-bit input (§3.5–3.6), as a JSON-able dict.

    BOPs of a layer: MACs · b_a · b_w · keep, where b_a is the bit width of the quantizer feeding it (8 for the
    network input, 32 for float tensors) and keep = kept output channels × kept input channels (the
    previous layer's mask where the topology says it removes them; for depthwise convs the channels where both
    survive). Quantizers in no group (pre-add) are not counted.
    """
    macs = count_macs(model, input_shape)
    topo = model.topology()
    layers: dict[str, QuantLayer] = {n: model.get_submodule(n) for g in topo.groups for n in g.layers}
    missing = set(macs) - set(layers)
    if missing:
        raise RuntimeError(f"layers {sorted(missing)} are in no quantizer group; fix {type(model).__name__}.topology")

    def effective_mask(name: str) -> Tensor | None:
        """Output channels that carry data: own mask, and for depthwise convs also the input's."""
        layer = layers[name]
        own = _mask(layer.weight_quantizer)
        src = topo.input_from.get(name)
        if src is None or not (isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels > 1):
            return own
        upstream = effective_mask(src)
        if upstream is None:
            return own
        return upstream if own is None else own * upstream

    rows, total = [], 0.0
    for group in topo.groups:
        b_a = INPUT_BITS if group.act is None else _bits(_quantizer_at(model, group.act))
        for name in group.layers:
            layer = layers[name]
            src = topo.input_from.get(name)
            in_mask = None if src is None else effective_mask(src)
            out_keep = _mean(_mask(layer.weight_quantizer))
            in_keep = _mean(in_mask)
            depthwise = isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels > 1
            keep = _mean(effective_mask(name)) if depthwise else out_keep * in_keep
            b_w = _bits(layer.weight_quantizer)
            bops = macs[name] * b_a * b_w * keep
            total += bops
            row = {
                "name": name,
                "macs": macs[name],
                "input_bits": b_a,
                "weight_bits": b_w,
                "act_bits": None if layer.act_quantizer is None else _bits(layer.act_quantizer),
                "kept_out_pct": 100.0 * out_keep,
                "kept_in_pct": 100.0 * in_keep,
                "gbops": bops / 1e9,
            }
            for kind in ("weight", "act"):
                q = getattr(layer, f"{kind}_quantizer")
                row[kind] = None if q is None else _quantizer_row(f"{name}.{kind}_quantizer", q)
            rows.append(row)

    quantizer_rows = [
        _quantizer_row(n, m) for n, m in model.named_modules() if isinstance(m, (BayesianBitsQuantizer, FixedQuantizer))
    ]
    weight_counts = Counter(str(r["bits"]) for r in quantizer_rows if r["name"].endswith("weight_quantizer"))
    act_counts = Counter(str(r["bits"]) for r in quantizer_rows if not r["name"].endswith("weight_quantizer"))
    baseline = sum(macs.values()) * BASELINE_BITS
    return {
        "relative_bops": 100.0 * total / baseline,
        "gbops": total / 1e9,
        "gbops_baseline": baseline / 1e9,
        "total_macs": sum(macs.values()),
        "weight_bit_counts": dict(sorted(weight_counts.items(), key=lambda kv: int(kv[0]))),
        "act_bit_counts": dict(sorted(act_counts.items(), key=lambda kv: int(kv[0]))),
        "layers": rows,
        "quantizers": quantizer_rows,
    }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_report(report: dict) -> str:
    """The report as text: one row per layer, bit-width counts and the BOP summary line."""
    head = (
        f"{'layer':<32} {'MACs':>11} {'in':>3} {'W':>3} {'A':>3} {'out%':>6} {'in%':>6} "
        f"{'w x_max':>9} {'a x_max':>9}  {'w σ(γ4..γ32)':<27} {'a σ(γ4..γ32)':<27}"
    )
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        w, a = r["weight"] or {}, r["act"] or {}
        wg = " ".join(f"{g:.2f}" for g in w.get("gates", [])) or "-"
        ag = " ".join(f"{g:.2f}" for g in a.get("gates", [])) or "-"
        lines.append(
            f"{r['name']:<32} {r['macs']:>11,} {r['input_bits']:>3} {r['weight_bits']:>3} "
            f"{_fmt(r['act_bits'], 'd'):>3} {r['kept_out_pct']:>6.1f} {r['kept_in_pct']:>6.1f} "
            f"{_fmt(w.get('x_max'), '.4g'):>9} {_fmt(a.get('x_max'), '.4g'):>9}  {wg:<27} {ag:<27}"
        )
    ungrouped = {r["name"] for r in report["quantizers"]} - {
        q["name"] for r in report["layers"] for q in (r["weight"], r["act"]) if q
    }
    for q in report["quantizers"]:
        if q["name"] in ungrouped:
            lines.append(
                f"{q['name']:<32} {'(block output)':>11} {'':>3} {'':>3} {q['bits']:>3} {'':>6} {'':>6} {'':>9} "
                f"{q['x_max']:>9.4g}  {'':<27} {' '.join(f'{g:.2f}' for g in q.get('gates', [])) or '-':<27}"
            )
    lines.append(f"weight quantizers per bit width: {report['weight_bit_counts']}")
    lines.append(f"activation quantizers per bit width: {report['act_bit_counts']}")
    lines.append(
        f"relative bops: {report['relative_bops']:.2f}%  GBOPs: {report['gbops']:.2g}  "
        f"GBOPs baseline: {report['gbops_baseline']:.2g}"
    )
    return "\n".join(lines)
