"""Top-1 of a checkpoint's exports on its validation set: the PyTorch eval model, the pruned model, the packed
model and the ONNX QDQ graph under onnxruntime, with their prediction agreement, logit differences (the largest, and
the images whose largest |Δ logit| exceeds 1e-5) and file sizes. Each format's error is also taken against a
high-precision reference, the eval model in float64 (its quantizers still compute in fp32, so its activations are on
the same grids; convolutions, matrix products and the rest gain precision, and so does a batch-norm fold, which can
move a folded weight at a rounding tie to the next code), and set beside the fp32 eval model's own error:
flash-attention's rule, at most twice the plain implementation's error.

    python -m evaluations.export_parity CHECKPOINT --data-dir data [--out export_parity.json] [--keep DIR]

Writes JSON (and prints it). Real data only: the validation split of the checkpoint's experiment.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from bayesian_bits.data import build_datasets
from bayesian_bits.errors import UsageError
from bayesian_bits.experiments import get_experiment
from bayesian_bits.export import export, load_eval_model, load_packed, load_pruned, onnxruntime_session
from bayesian_bits.export.pruned import layer_parameters

TOLERANCE = 1e-5  # |Δ logit| the issue of one arithmetic for evaluation and deployment holds every image to


def main() -> int:
    """Run the comparison; a bad checkpoint, missing data or unwritable output is one line and exit status 2."""
    try:
        parity()
    except UsageError as exc:
        print(f"export_parity: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


@torch.no_grad()
def parity() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--out", default="export_parity.json")
    parser.add_argument("--keep", help="folder to keep the exported files in (default: a temporary one; files of an "
                        "earlier run there are replaced)")
    parser.add_argument("--trust-model-code", action="store_true",
                        help="import the package.module:callable model the checkpoint names")
    args = parser.parse_args()
    trust = args.trust_model_code
    loaded = load_eval_model(args.checkpoint, trust_model_code=trust)
    exp = get_experiment(loaded.options["experiment"], loaded.name)
    _, val = build_datasets(exp, args.data_dir)
    folder = Path(args.keep or tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    files = {fmt: folder / name for fmt, name in (("manifest", "manifest.json"), ("pruned", "pruned.pt"),
                                                  ("packed", "model.packed"), ("onnx", "model.onnx"))}
    summaries = {fmt: export(args.checkpoint, fmt, path, trust_model_code=trust, overwrite=True)
                 for fmt, path in files.items()}
    pruned = load_pruned(files["pruned"], trust_model_code=trust)
    packed = load_packed(files["packed"], trust_model_code=trust)
    session = onnxruntime_session(files["onnx"])
    models = {"pytorch_eval": loaded.model, "pruned": pruned, "packed": packed}
    reference = copy.deepcopy(loaded.model).double()
    correct = dict.fromkeys([*models, "onnxruntime"], 0)
    agree = dict.fromkeys(["pruned", "packed", "onnxruntime"], 0)
    max_diff, over = dict.fromkeys(agree, 0.0), dict.fromkeys(agree, 0)
    max_error, over_fp64 = dict.fromkeys(correct, 0.0), dict.fromkeys(correct, 0)
    total, max_logit = 0, 0.0
    for x, y in tqdm(DataLoader(val, batch_size=args.batch_size), desc="evaluating", unit="batch"):
        logits = {name: m(x) for name, m in models.items()}
        max_logit = max(max_logit, float(logits["pytorch_eval"].abs().max()))
        logits["onnxruntime"] = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        exact = reference(x.double())
        ref = logits["pytorch_eval"].argmax(1)
        for name, out in logits.items():
            correct[name] += int((out.argmax(1) == y).sum())
            error = (out.double() - exact).abs().amax(1)
            max_error[name] = max(max_error[name], float(error.max()))
            over_fp64[name] += int((error > TOLERANCE).sum())
            if name in agree:
                agree[name] += int((out.argmax(1) == ref).sum())
                diff = (out - logits["pytorch_eval"]).abs().amax(1)
                max_diff[name] = max(max_diff[name], float(diff.max()))
                over[name] += int((diff > TOLERANCE).sum())
        total += len(y)
    result = {
        "checkpoint": args.checkpoint,
        "model": loaded.name,
        "examples": total,
        "top1_pct": {name: 100.0 * c / total for name, c in correct.items()},
        "prediction_agreement_pct": {name: 100.0 * a / total for name, a in agree.items()},
        "max_abs_logit_diff": max_diff,
        "images_over_tolerance": over,
        "tolerance": TOLERANCE,
        "max_abs_logit": max_logit,
        "max_abs_error_vs_fp64": max_error,
        "images_over_tolerance_vs_fp64": over_fp64,
        "error_over_eval_error": {name: e / max_error["pytorch_eval"] if max_error["pytorch_eval"] else None
                                  for name, e in max_error.items()},
        "bytes": {fmt: path.stat().st_size for fmt, path in files.items()} | {
            "checkpoint": Path(args.checkpoint).stat().st_size,
            "fp32_weights": 4 * sum(p.numel() for n, p in loaded.model.state_dict().items() if "quantizer" not in n)},
        "parameters": {"eval": layer_parameters(loaded.model), "pruned": layer_parameters(pruned)},
        "summaries": summaries,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
