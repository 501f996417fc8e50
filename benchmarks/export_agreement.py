"""How exactly the exports compute a trained model on its real test set: ``pruned``, ``packed`` and the ONNX file in a
default onnxruntime session against the PyTorch eval model.

    python -m benchmarks.export_agreement CHECKPOINT [--data-dir data] [--batch 1000] [--json F]

Per format: the images whose prediction differs from the eval model's, the images whose largest |Δ logit| exceeds
1e-5, and the largest |Δ logit| with the largest |logit| of the eval model for scale.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from bayesian_bits.data import load_data
from bayesian_bits.experiments import get_experiment
from bayesian_bits.export import FORMATS, load_eval_model, load_packed, load_pruned, onnxruntime_session

from . import harness

TOLERANCE = 1e-5


@torch.no_grad()
def agreement(checkpoint: str, data_dir: str, batch: int) -> dict[str, Any]:
    """The counts and largest differences of each format over the checkpoint's test set."""
    loaded = load_eval_model(checkpoint)
    options = loaded.options
    saved = options.get("dataset") or {}
    norm = (saved["mean"], saved["std"]) if saved.get("mean") is not None else None
    exp = get_experiment(options["experiment"], options["model"])
    test_set = load_data(exp, data_dir, image_size=options.get("image_size"), channels=options.get("channels"),
                         num_classes=options.get("num_classes"), norm=norm, fetch=False).val
    with tempfile.TemporaryDirectory() as tmp:
        files = {fmt: Path(tmp) / fmt for fmt in ("pruned", "packed", "onnx")}
        for fmt, path in files.items():
            FORMATS[fmt](loaded, path)
        session = onnxruntime_session(str(files["onnx"]))
        models = {"pruned": load_pruned(files["pruned"]), "packed": load_packed(files["packed"]),
                  "onnx": lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])}
        stats = {fmt: {"predictions_differ": 0, "images_over_tolerance": 0, "max_abs_diff": 0.0} for fmt in models}
        images, largest = 0, 0.0
        for x, _ in tqdm(DataLoader(test_set, batch_size=batch), desc="test set", leave=False):
            ref = loaded.model(x)
            images, largest = images + len(x), max(largest, float(ref.abs().max()))
            for fmt, model in models.items():
                out = model(x)
                diff, row = (out - ref).abs().amax(1), stats[fmt]
                row["predictions_differ"] += int((out.argmax(1) != ref.argmax(1)).sum())
                row["images_over_tolerance"] += int((diff > TOLERANCE).sum())
                row["max_abs_diff"] = max(row["max_abs_diff"], float(diff.max()))
    return {"checkpoint": checkpoint, "images": images, "max_abs_logit": largest, "tolerance": TOLERANCE,
            "formats": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--json", default="bench_out/export_agreement.json")
    args = parser.parse_args()
    result = agreement(args.checkpoint, args.data_dir, args.batch)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    harness.write_json(Path(args.json), result, "cpu")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
