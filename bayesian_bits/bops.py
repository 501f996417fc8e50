"""MACs, BOP-weighted regulariser set-up, the BOP report and its differentiable twin (SPEC B §3.2–3.7, §6.10, A8).

Every figure is computed from the dataflow that `prepare` recorded (`dataflow.Dataflow`). The report and the
expected BOPs walk the same terms with two evaluators: eval bit widths and 0/1 keep masks, or expected bit widths
and keep probabilities from the gate logits (equal when every gate probability is 0 or 1).
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import gate_bank, gates
from .gate_bank import GateBank
from .graph.dataflow import FLOAT_BITS, Dataflow, Slice, Term, dataflow, unwrap
from .quantizer import BayesianBitsQuantizer, FixedQuantizer, Mode, quantizers

BASELINE_BITS = FLOAT_BITS * FLOAT_BITS  # relative BOPs are against W32A32


def count_macs(model: nn.Module) -> dict[str, int]:
    """MACs of every conv, linear and activation matmul for one batch-1 forward of the example input (§3.2):
    bias adds are not counted."""
    return {t.name: t.macs for t in dataflow(model).terms}


def _module(model: nn.Module, path: str | None) -> nn.Module | None:
    return None if path is None else model.get_submodule(path)


def _bb(module: nn.Module | None) -> BayesianBitsQuantizer | None:
    return module if isinstance(module, BayesianBitsQuantizer) else None


def assign_macs(model: nn.Module) -> dict[str, int]:
    """Give each Bayesian Bits quantizer its BOP weight MACs / max MACs for reg_type 'bop' (§3.2): a weight
    quantizer its layer's MACs, an activation quantizer the sum over the ops it feeds (a concatenation slice its
    share). Quantizers feeding no op (pre-add tensors) and, in prune-only mode, activation quantizers keep weight
    1. Returns the MACs."""
    flow, model = dataflow(model), unwrap(model)
    macs = {t.name: t.macs for t in flow.terms}
    max_macs = max(macs.values())
    prune_only = any(q.prune_only for q in model.modules() if isinstance(q, BayesianBitsQuantizer))
    act_macs: dict[str, float] = {}
    for term in flow.terms:
        q = _bb(_module(model, term.weight))
        if q is not None:
            q.bop_weight = term.macs / max_macs
        for s in (*term.inputs, *term.other):
            if s.quantizer is not None:
                act_macs[s.quantizer] = act_macs.get(s.quantizer, 0.0) + s.fraction * term.macs
    if not prune_only:
        for path, m in act_macs.items():
            q = _bb(_module(model, path))
            if q is not None:
                q.bop_weight = m / max_macs
    return macs


@dataclass(frozen=True)
class Evaluator:
    """How a quantizer's bit width and a layer's output-channel keep vector are read: eval gates or expectations."""

    bits: Callable[[nn.Module], Tensor | float]
    keep: Callable[[nn.Module], Tensor | None]


def _counted(bits: int | None) -> int:
    """The bits a tensor counts with in BOPs: its bit width, FLOAT_BITS for a float tensor."""
    return FLOAT_BITS if bits is None else bits


def _eval_bits(q: nn.Module) -> float:
    return float(_counted(q.bit_width()))


def _eval_keep(q: nn.Module) -> Tensor | None:
    mask = q.keep_mask()
    return None if mask is None else mask.float()


EVAL = Evaluator(_eval_bits, _eval_keep)


@dataclass
class TermBops:
    """One op's BOPs and the factors they are made of (tensors under EXPECTED, floats under EVAL)."""

    term: Term
    input_bits: Tensor | float
    weight_bits: Tensor | float
    kept_out: Tensor | float
    kept_in: Tensor | float
    bops: Tensor | float


def _mean(v: Tensor | None) -> Tensor | float:
    return 1.0 if v is None else v.mean()


def term_bops(model: nn.Module, ev: Evaluator) -> list[TermBops]:
    """Per op: BOPs = MACs · b_in · b_w · keep (§3.5). b_in mixes the input slices' bit widths by share (8 for the
    network input, FLOAT_BITS for float tensors); b_w is the weight's (FLOAT_BITS for a float layer) or the second
    operand's for an activation matmul; keep is the kept output share times the kept input share (each slice through
    its `mask_from` layer), and for a depthwise conv the share of channels where both its own and its input's
    channels survive."""
    flow, model = dataflow(model), unwrap(model)
    out_keep: dict[str, Tensor | None] = {}  # effective kept-output vector of each layer (depthwise: with input's)

    def bits(slices: tuple[Slice, ...]) -> Tensor | float:
        return sum(s.fraction * (_counted(s.bits) if s.quantizer is None else ev.bits(_module(model, s.quantizer)))
                   for s in slices)

    rows = []
    for term in flow.terms:
        wq = _module(model, term.weight)
        own = None if wq is None else ev.keep(wq)
        b_w = bits(term.other) if term.other else (float(FLOAT_BITS) if wq is None else ev.bits(wq))
        upstream = [out_keep.get(s.mask_from) if s.mask_from else None for s in term.inputs]
        if term.depthwise and len(upstream) == 1 and upstream[0] is not None:
            eff = upstream[0] if own is None else own * upstream[0]
            out_keep[term.name] = eff
            kept_out, kept_in, keep = _mean(own), _mean(upstream[0]), _mean(eff)
        else:
            out_keep[term.name] = own
            kept_out = _mean(own)
            kept_in = sum(s.fraction * _mean(u) for s, u in zip(term.inputs, upstream, strict=True))
            keep = kept_out * kept_in
        b_in = bits(term.inputs)
        rows.append(TermBops(term, b_in, b_w, kept_out, kept_in, term.macs * b_in * b_w * keep))
    return rows


def baseline_bops(model: nn.Module) -> int:
    """W32A32 BOPs over every conv, linear and matmul: the denominator of relative BOPs (§3.5)."""
    return dataflow(model).total_macs * BASELINE_BITS


@dataclass(frozen=True)
class ExpectedBops:
    """`term_bops`' sum compiled for a model's gate bank: with x = (expected bits of every bank row, 1) and
    k = (mean keep probability of every row, 1), E[BOPs] = Σ_t MACs_t·(A_in x)_t·(A_w x)_t·(K_out k)_t·(K_in k)_t.
    A_in / A_w mix the input / weight slices' bits by share (constant bits in the last column), K_out picks the
    layer's own keep share and K_in mixes its input slices' upstream keep shares (a depthwise conv passes its input's
    on, as in `term_bops`). A handful of kernels per evaluation, whatever the number of layers."""

    flow: Dataflow
    macs: Tensor  # T
    bits: Tensor  # 2T × (Q + 1): A_in over A_w
    keep: Tensor  # 2T × (Q + 1): K_out over K_in

    @classmethod
    def compile(cls, model: nn.Module, bank: GateBank) -> ExpectedBops:
        flow = dataflow(model)
        rows = {id(q): q.row for _, q in quantizers(model) if isinstance(q, BayesianBitsQuantizer) and q.bank is bank}
        const = bank.rows  # the constant column
        terms = flow.terms
        bits = torch.zeros(2 * len(terms), const + 1, dtype=torch.float64)
        keep = torch.zeros(2 * len(terms), const + 1, dtype=torch.float64)

        def column(path: str) -> int | None:
            return rows.get(id(_module(model, path)))

        def add_bits(i: int, slices: tuple[Slice, ...]) -> None:
            for s in slices:
                col = None if s.quantizer is None else column(s.quantizer)
                if col is None:
                    fixed = _counted(s.bits) if s.quantizer is None else _eval_bits(_module(model, s.quantizer))
                    bits[i, const] += s.fraction * fixed
                else:
                    bits[i, col] += s.fraction

        effective: dict[str, int | None] = {}  # the row whose keep vector is a layer's output keep (None: all kept)
        for t, term in enumerate(terms):
            own = None
            if term.weight is not None and _module(model, term.weight).keep_mask() is not None:
                own = column(term.weight)
                if own is None:
                    raise ValueError(f"expected BOPs: layer {term.name}'s pruning gates are not in the gate bank")
            add_bits(t, term.inputs)
            if term.other:
                add_bits(len(terms) + t, term.other)
            elif term.weight is None:
                bits[len(terms) + t, const] = FLOAT_BITS
            else:
                col = column(term.weight)
                if col is None:
                    bits[len(terms) + t, const] = _eval_bits(_module(model, term.weight))
                else:
                    bits[len(terms) + t, col] = 1.0
            upstream = [effective.get(s.mask_from) if s.mask_from else None for s in term.inputs]
            if term.depthwise and len(upstream) == 1 and upstream[0] is not None:
                if own is not None:
                    raise ValueError(f"expected BOPs: depthwise layer {term.name} has pruning gates of its own")
                effective[term.name] = upstream[0]
            else:
                effective[term.name] = own
            keep[t, const if own is None else own] = 1.0
            for s, u in zip(term.inputs, upstream, strict=True):
                keep[len(terms) + t, const if u is None else u] += s.fraction
        device = bank.gamma_logits.device
        macs = torch.tensor([float(t.macs) for t in terms], device=device)
        return cls(flow, macs, bits.float().to(device), keep.float().to(device))

    def __call__(self, bank: GateBank) -> Tensor:
        ones = bank.gamma_logits.new_ones(1)
        kept = torch.where(bank.has_channels, bank.mean_per_row(bank.keep_probabilities()), 1.0)
        b_in, b_w = (self.bits @ torch.cat([bank.expected_bits(), ones])).chunk(2)
        k_out, k_in = (self.keep @ torch.cat([kept, ones])).chunk(2)
        return (self.macs * b_in * b_w * k_out * k_in).sum()


_PROGRAMS: weakref.WeakKeyDictionary[GateBank, ExpectedBops] = weakref.WeakKeyDictionary()


def expected_bops(model: nn.Module) -> Tensor:
    """Differentiable expected BOPs from the gate probabilities (bit levels and pruning gates), the twin of
    `bop_report`'s total: equal to it when every gate probability is 0 or 1 (without a gate bank: that total)."""
    inner = unwrap(model)
    bank = getattr(inner, gate_bank.ATTRIBUTE, None)
    if not isinstance(bank, GateBank):
        return torch.tensor(float(sum(float(r.bops) for r in term_bops(model, EVAL))))
    program = _PROGRAMS.get(bank)
    if program is None or program.flow is not dataflow(model) or program.macs.device != bank.gamma_logits.device:
        program = _PROGRAMS[bank] = ExpectedBops.compile(inner, bank)
    return program(bank)


def expected_relative_bops(model: nn.Module) -> Tensor:
    """`expected_bops` in percent of W32A32, the unit of `bop_report`'s `relative_bops`."""
    return 100.0 * expected_bops(model) / baseline_bops(model)


def _shown_bits(q: BayesianBitsQuantizer | FixedQuantizer) -> int | str:
    """A quantizer's eval bit width as reports show it: the number, or "float"."""
    bits = q.bit_width()
    return "float" if bits is None else bits


def _quantizer_row(name: str, q: BayesianBitsQuantizer | FixedQuantizer) -> dict:
    row = {"name": name, "mode": q.mode.value, "bits": _shown_bits(q), "signed": q.is_signed,
           "x_max": float(q.x_max.detach())}
    mask = q.keep_mask()
    row["kept_pct"] = None if mask is None else 100.0 * float(mask.float().mean())
    if isinstance(q, BayesianBitsQuantizer):
        row["x_min"] = float(q.x_min)
        # Printed as plain σ(gamma), as the reference's table does (§6.10).
        row["gates"] = [round(float(v), 5) for v in torch.sigmoid(q.gammas.detach())]
        row["p_off"] = None if q.gamma_2 is None else float(torch.sigmoid(gates.OFFSET - q.gamma_2.detach()).mean())
    return row


def _num(v: Tensor | float) -> float:
    return float(v)


def _bits_value(v: Tensor | float, is_float: bool) -> int | float | str:
    """Bits for the report: "float" for float tensors, an int, or a share-weighted mix (concatenations)."""
    if is_float:
        return "float"
    f = float(v)
    return int(f) if f.is_integer() else round(f, 3)


def _all_float(model: nn.Module, slices: tuple[Slice, ...]) -> bool:
    return all(s.bits is None if s.quantizer is None else model.get_submodule(s.quantizer).mode is Mode.FLOAT
               for s in slices)


def _count_order(item: tuple[str, int]) -> int:
    return FLOAT_BITS + 1 if item[0] == "float" else int(item[0])


@torch.no_grad()
def bop_report(model: nn.Module) -> dict:
    """Eval bit widths, keep ratios and BOPs relative to W32A32 with an 8-bit input (§3.5–3.6), as a JSON-able dict.

    One row per conv/linear layer (and activation matmul); quantizers that feed no op (pre-add tensors) are listed
    but not counted. Float tensors show as "float" (and count as FLOAT_BITS). MACs are those of the example input
    `prepare` was given (batch 1).
    """
    inner = unwrap(model)
    rows, total = [], 0.0
    for r in term_bops(model, EVAL):
        term = r.term
        layer = inner.get_submodule(term.name) if term.layer else None
        act_q = None if layer is None else getattr(layer, "act_quantizer", None)
        weight_q = _module(inner, term.weight)
        total += _num(r.bops)
        rows.append({
            "name": term.name,
            "macs": term.macs,
            "input_bits": _bits_value(r.input_bits, _all_float(inner, term.inputs)),
            "weight_bits": _bits_value(r.weight_bits, _all_float(inner, term.other) if term.other else
                                       weight_q is None or weight_q.mode is Mode.FLOAT),
            "act_bits": None if act_q is None else _shown_bits(act_q),
            "kept_out_pct": 100.0 * _num(r.kept_out),
            "kept_in_pct": 100.0 * _num(r.kept_in),
            "gbops": _num(r.bops) / 1e9,
            "weight": None if weight_q is None else _quantizer_row(term.weight, weight_q),
            "act": None if act_q is None else _quantizer_row(f"{term.name}.act_quantizer", act_q),
        })
    quantizer_rows = [_quantizer_row(n, m) for n, m in quantizers(inner)]
    weight_counts = Counter(str(r["bits"]) for r in quantizer_rows if r["name"].endswith("weight_quantizer"))
    act_counts = Counter(str(r["bits"]) for r in quantizer_rows if not r["name"].endswith("weight_quantizer"))
    baseline = baseline_bops(model)
    return {
        "relative_bops": 100.0 * total / baseline,
        "gbops": total / 1e9,
        "gbops_baseline": baseline / 1e9,
        "total_macs": dataflow(model).total_macs,
        "weight_bit_counts": dict(sorted(weight_counts.items(), key=_count_order)),
        "act_bit_counts": dict(sorted(act_counts.items(), key=_count_order)),
        "layers": rows,
        "quantizers": quantizer_rows,
    }


def _fmt(v: float | str | None, spec: str) -> str:
    return "-" if v is None else v if isinstance(v, str) else format(v, spec)


def format_report(report: dict) -> str:
    """The report as text: one row per layer (and per activation matmul), then the quantizers placed after other
    ops (adds, norms, softmax), bit-width counts and the BOP summary line."""
    n = max([32, *(len(r["name"]) for r in report["layers"]), *(len(q["name"]) for q in report["quantizers"])])
    head = (
        f"{'layer':<{n}} {'MACs':>11} {'in':>5} {'W':>5} {'A':>5} {'out%':>6} {'in%':>6} "
        f"{'w x_max':>9} {'a x_max':>9}  {'w σ(γ4..γ32)':<27} {'a σ(γ4..γ32)':<27}"
    )
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        w, a = r["weight"] or {}, r["act"] or {}
        wg = " ".join(f"{g:.2f}" for g in w.get("gates", [])) or "-"
        ag = " ".join(f"{g:.2f}" for g in a.get("gates", [])) or "-"
        lines.append(
            f"{r['name']:<{n}} {r['macs']:>11,} {_fmt(r['input_bits'], 'g'):>5} {_fmt(r['weight_bits'], 'g'):>5} "
            f"{_fmt(r['act_bits'], 'd'):>5} {r['kept_out_pct']:>6.1f} {r['kept_in_pct']:>6.1f} "
            f"{_fmt(w.get('x_max'), '.4g'):>9} {_fmt(a.get('x_max'), '.4g'):>9}  {wg:<27} {ag:<27}"
        )
    listed = {q["name"] for r in report["layers"] for q in (r["weight"], r["act"]) if q}
    for q in report["quantizers"]:
        if q["name"] not in listed:
            lines.append(
                f"{q['name']:<{n}} {'(after an op)':>11} {'':>5} {'':>5} {q['bits']:>5} {'':>6} {'':>6} "
                f"{'':>9} {q['x_max']:>9.4g}  {'':<27} {' '.join(f'{g:.2f}' for g in q.get('gates', [])) or '-':<27}"
            )
    lines.append(f"weight quantizers per bit width: {report['weight_bit_counts']}")
    lines.append(f"activation quantizers per bit width: {report['act_bit_counts']}")
    lines.append(
        f"relative bops: {report['relative_bops']:.2f}%  GBOPs: {report['gbops']:.2g}  "
        f"GBOPs baseline: {report['gbops_baseline']:.2g}"
    )
    return "\n".join(lines)
