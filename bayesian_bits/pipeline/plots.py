"""PNG plots of a run: per-layer bit widths with kept channels; top-1 and relative BOPs. Drawn on standalone
matplotlib figures (no pyplot), so the user's plotting backend is never touched."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from bbkernels.ladder import BITS

from ..checkpoint_io import write_atomic

BITS_PNG = "bits_per_layer.png"
CURVES_PNG = "training_curves.png"
BUDGET_PNG = "budget.png"
NO_ACT_LABEL = "no activation quantizer"
LEGEND_COLUMNS = 3
TITLE_CHARS_PER_INCH = 9  # at the default 12-point title font


def plot_layers(layers: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Bars of weight and activation bits per layer; the kept-channel fraction on a second axis."""
    names = [row["name"] for row in layers]
    xs = range(len(names))
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 2), 4.5))
    ax = fig.subplots()
    width = 0.4
    for offset, key, label, color in ((-width / 2, "weight_bits", "weight bits", "C0"),
                                      (width / 2, "act_bits", "activation bits", "C1")):
        values = [row.get(key) for row in layers]
        quantized = [(x, v) for x, v in zip(xs, values, strict=True) if isinstance(v, (int, float))]
        if quantized:
            ax.bar([x + offset for x, _ in quantized], [v for _, v in quantized], width, label=label, color=color)
        floats = [x + offset for x, v in zip(xs, values, strict=True) if v == "float"]
        if floats:  # drawn to the top of the axis, hatched: no bit width
            ax.bar(floats, [BITS[-1]] * len(floats), width, color="white", edgecolor=color, hatch="//",
                   label=f"{label.split()[0]} float (not quantized)")
    bare = [x for x, row in zip(xs, layers, strict=True) if row.get("act_bits") is None]
    if bare:
        ax.plot([x + width / 2 for x in bare], [0.85 * BITS[0]] * len(bare), "kx", label=NO_ACT_LABEL)
    ax.set_yscale("log", base=2)
    ax.set_yticks(list(BITS), [str(b) for b in BITS])
    ax.set_ylim(0.75 * BITS[0], 1.5 * BITS[-1])
    ax.set_ylabel("bits")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=7)
    kept = ax.twinx()
    kept.plot(list(xs), [row["kept_out_pct"] / 100 for row in layers], "k.-", label="kept output channels")
    kept.set_ylim(0, 1.05)
    kept.set_ylabel("fraction of output channels kept")
    handles = ax.get_legend_handles_labels()[0] + kept.get_legend_handles_labels()[0]
    handles.sort(key=lambda h: h.get_label() == NO_ACT_LABEL)  # the bars' entries first
    ax.set_title(_fit(title, fig), pad=_legend_above(ax, handles))
    fig.tight_layout()
    _save(fig, path)


def _legend_above(ax: Any, handles: list[Any]) -> int:
    """One legend for both axes, in rows of at most LEGEND_COLUMNS above the plot (never over the data); returns
    the title padding (points) that clears it."""
    ax.legend(handles, [h.get_label() for h in handles], loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncols=min(len(handles), LEGEND_COLUMNS), fontsize=8, frameon=False)
    return 14 + 14 * -(-len(handles) // LEGEND_COLUMNS)


def plot_curves(records: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Top-1 (left axis, 0–100 %) and relative BOPs (right axis, log with plain labels) over the evaluated
    epochs; a dashed line where fixed-gate fine-tuning starts, if it does."""
    evaluated = [r for r in records if r.get("top1") is not None]
    xs = [r["index"] for r in evaluated]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(xs, [r["top1"] for r in evaluated], "C0o-", label="top-1 % (left)")
    ax.set_ylim(0, 100)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(0.5, max(xs, default=1) + 0.5)
    finetune = [r["index"] for r in records if r.get("phase") == "finetune"]
    ax.set_xlabel("epoch (training, then fine-tuning)" if finetune else "epoch")
    ax.set_ylabel("top-1 accuracy (%)", color="C0")
    ax.grid(alpha=0.3)
    bops = ax.twinx()
    bops.plot(xs, [r["relative_bops"] for r in evaluated], "C1s-", label="relative BOPs % (right)")
    bops.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    bops.yaxis.set_major_formatter(plain)
    bops.yaxis.set_minor_formatter(plain)
    bops.tick_params(axis="y", which="minor", labelsize=7)
    bops.set_ylabel("relative BOPs vs W32A32 (%)", color="C1")
    handles = ax.get_legend_handles_labels()[0] + bops.get_legend_handles_labels()[0]
    if finetune:
        handles.append(ax.axvline(min(finetune) - 0.5, color="k", linestyle="--", label="fine-tuning starts"))
    ax.set_title(_fit(title, fig), pad=_legend_above(ax, handles))
    fig.tight_layout()
    _save(fig, path)


def _fit(title: str, fig: Figure) -> str:
    """The title wrapped to the figure's width (a long model name would run past both edges)."""
    return textwrap.fill(title, width=int(TITLE_CHARS_PER_INCH * fig.get_figwidth()))


def _save(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_atomic(path, lambda fh: fh.write(buf.getbuffer()), size=buf.tell())


def plot_budget(records: Sequence[dict[str, Any]], path: Path, title: str, final_rel_bops: float) -> None:
    """A BOP-budgeted run per training epoch: expected and eval relative BOPs (log) against the target band
    [0.9, 1] x target, the reference trajectory at the switching points and the cuts made there, μ on the right
    axis (log); the final model (after the projection) as a star."""
    trained = [r for r in records if r.get("mu") is not None]
    switches = [r for r in records if r.get("phase") == "switch"]
    cuts = [r for r in switches if r["switched_off"]]
    xs = [r["index"] for r in trained]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    if trained:
        target = trained[-1]["target_rel_bops"]
        ax.axhspan(0.9 * target, target, color="k", alpha=0.12, label=f"target band [0.9, 1] x {target:g} %")
    ax.plot(xs, [r["expected_rel_bops"] for r in trained], "C0o-", label="expected (gate probabilities)")
    ax.plot(xs, [r["eval_rel_bops"] for r in trained], "C1s--", label="eval model")
    if switches:
        ax.plot([r["epoch"] for r in switches], [r["reference_rel_bops"] for r in switches], "k:", lw=1,
                label="reference trajectory")
    if cuts:
        ax.vlines([r["epoch"] for r in cuts], [r["after_rel_bops"] for r in cuts],
                  [r["before_rel_bops"] for r in cuts], colors="C3", lw=1)
        ax.plot([r["epoch"] for r in cuts], [r["after_rel_bops"] for r in cuts], "C3v", markersize=4,
                label=f"eval model cut at a switching point ({len(cuts)})")
    if xs:
        ax.plot([xs[-1]], [final_rel_bops], "C3*", markersize=14, label="final model (projected)")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training epoch")
    ax.set_ylabel("relative BOPs vs W32A32 (%)")
    mu = ax.twinx()
    mu.plot(xs, [r["mu"] for r in trained], "C2^:", label="μ (right axis)")
    mu.set_yscale("log")
    mu.yaxis.set_major_formatter(plain)
    mu.yaxis.set_minor_formatter(plain)
    mu.tick_params(axis="y", which="minor", labelsize=7)
    mu.set_ylabel("μ (regulariser weight)", color="C2")
    handles = ax.get_legend_handles_labels()[0] + mu.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    ax.set_title(_fit(title, fig))
    fig.tight_layout()
    _save(fig, path)
