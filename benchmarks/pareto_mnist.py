"""Accuracy against relative BOPs on MNIST LeNet5: one run per BOP target (and optionally per fixed μ), with the
reference README's MNIST flags otherwise and the same epochs for every run; the paper's point (0.36 %, 99.30 %) is
marked.

    python -m benchmarks.pareto_mnist --data-dir data --epochs 3 [--finetune-epochs 0] [--finetune-optimizer Adam]
        [--finetune-learning-rate 1e-4]
        [--targets 1.0 0.5 0.36 0.30] [--mus 0.1] [--runs runs/pareto] [--out results/mnist/pareto] [--reuse]

Each run writes RUNS/target_P (or RUNS/mu_M); `--reuse` reads a run's summary.json instead of training it again
when present. Writes OUT.csv and OUT.png. Real MNIST only (downloaded into --data-dir when missing).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from bayesian_bits.cli import main as cli_main
from bayesian_bits.pipeline.optim import FINETUNE_LR, OPTIMIZERS

PAPER = (0.36, 99.30)  # Bayesian Bits, MNIST LeNet5 (relative BOPs %, top-1 %)
# The reference README's MNIST command (SPEC B §9), without --epochs and the output folder.
README_FLAGS = ["--experiment", "mnist", "--model", "lenet5quantized", "--batch-size", "128", "--optimizer", "Adam",
                "--learning-rate", "1e-3", "--gating-lambda", "0.1", "--gamma-4-init", "6", "--gamma-8-init", "6",
                "--gamma-16-init", "-6", "--gamma-32-init", "-6", "--learned-scale", "range", "--include-pruning",
                "--reg-type", "bop", "--learning-rate-q", "1e-3", "--learning-rate-s", "1e-3", "--optimizer-q", "Adam",
                "--optimizer-s", "Adam"]
FIELDS = ["kind", "setting", "epochs", "finetune_epochs", "target_rel_bops", "relative_bops", "top1", "in_band",
          "wall_time_s", "logdir"]


def run_point(kind: str, value: str, args: argparse.Namespace) -> dict:
    """Train (or, with --reuse, read) one point; returns its CSV row."""
    logdir = Path(args.runs) / f"{kind}_{value}"
    summary_path = logdir / "summary.json"
    if not (args.reuse and summary_path.exists()):
        extra = ["--target-rel-bops", value] if kind == "target" else ["--gating-lambda", value]  # the last one wins
        code = cli_main(["train", *README_FLAGS, *extra, "--epochs", str(args.epochs),
                         "--fixed-gate-finetune-epochs", str(args.finetune_epochs),
                         "--finetune-optimizer", args.finetune_optimizer,
                         "--finetune-learning-rate", str(args.finetune_learning_rate), "--seed", str(args.seed),
                         "--data-dir", args.data_dir, "--logdir", str(logdir), "--overwrite"])
        if code != 0:
            raise SystemExit(f"pareto_mnist: the run in {logdir} failed (exit status {code})")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if summary.get("synthetic") or summary.get("experiment") != "mnist":
        raise SystemExit(f"pareto_mnist: {summary_path} is not a real-MNIST run")
    target = summary.get("target_rel_bops")
    rel = summary["relative_bops"]
    return {"kind": kind, "setting": value, "epochs": summary["epochs"],
            "finetune_epochs": summary["finetune_epochs"], "target_rel_bops": target,
            "relative_bops": rel, "top1": summary["top1"],
            "in_band": None if target is None else bool(0.9 * target <= rel <= target),
            "wall_time_s": round(summary["wall_time_s"], 1), "logdir": str(logdir)}


def plot(rows: list[dict], path: Path, epochs: set[tuple[int, int]]) -> None:
    """Top-1 against relative BOPs (log x): budgeted runs with their targets, fixed-μ runs, the paper's point."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    targets = [r for r in rows if r["kind"] == "target"]
    mus = [r for r in rows if r["kind"] == "mu"]
    if targets:
        ax.plot([r["relative_bops"] for r in targets], [r["top1"] for r in targets], "C0o-", label="BOP target")
        for r in targets:
            ax.axvspan(0.9 * r["target_rel_bops"], r["target_rel_bops"], color="C0", alpha=0.08)
            ax.annotate(f"target {r['target_rel_bops']:g} %", (r["relative_bops"], r["top1"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))
    if mus:
        ax.plot([r["relative_bops"] for r in mus], [r["top1"] for r in mus], "C1s", label="fixed μ")
        for r in mus:
            ax.annotate(f"μ {r['setting']}", (r["relative_bops"], r["top1"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.plot([PAPER[0]], [PAPER[1]], "C3*", markersize=14, label="paper (0.36 %, 99.30 %)")
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("relative BOPs vs W32A32 (%), eval model")
    ax.set_ylabel("top-1 accuracy (%)")
    runs = "/".join(f"{e}" + (f" + {f} fine-tune" if f else "") for e, f in sorted(epochs))
    ax.set_title(f"LeNet5 on MNIST, {runs} epochs per run (shaded: [0.9, 1] x target)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pareto_mnist", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="MNIST root (downloaded when missing)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of every run (default 3)")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="fixed-gate fine-tuning epochs after the projection, every run (default 0)")
    parser.add_argument("--finetune-optimizer", default="Adam", choices=OPTIMIZERS,
                        help="fine-tuning's weights optimizer (default Adam: the reference's SGD at 1e-4 is made for "
                        "ImageNet's SGD-trained weights and barely moves these Adam-trained ones)")
    parser.add_argument("--finetune-learning-rate", type=float, default=FINETUNE_LR,
                        help=f"fine-tuning's starting learning rate (default {FINETUNE_LR:g}, the reference's)")
    parser.add_argument("--targets", nargs="*", default=["1.0", "0.5", "0.36", "0.30"],
                        help="relative BOP targets in %% (default 1.0 0.5 0.36 0.30)")
    parser.add_argument("--mus", nargs="*", default=[], help="fixed --gating-lambda values to add (default none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    parser.add_argument("--runs", default="runs/pareto", help="parent of the run folders (default runs/pareto)")
    parser.add_argument("--out", default="results/mnist/pareto", help="output path without suffix (.csv, .png)")
    parser.add_argument("--reuse", action="store_true", help="read existing runs' summary.json instead of training")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.finetune_epochs < 0:
        parser.error(f"--finetune-epochs must be at least 0, got {args.finetune_epochs}")
    for t in [*args.targets, *args.mus]:
        try:
            if not float(t) > 0:
                raise ValueError
        except ValueError:
            parser.error(f"targets and μ values must be positive numbers, got {t!r}")
    rows = [run_point("target", t, args) for t in args.targets] + [run_point("mu", m, args) for m in args.mus]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out.with_suffix(".png"), {(r["epochs"], r["finetune_epochs"]) for r in rows})
    for r in rows:
        print(f"{r['kind']} {r['setting']}: {r['relative_bops']:.4f} % BOPs, top-1 {r['top1']:.2f} %"
              + ("" if r["in_band"] is None else f", in band: {r['in_band']}"))
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
