"""`prepare` on the zoos of tests/zoo.py (CNNs, an MLP, a transformer) and tests/attention_zoo.py (torchvision,
timm and Hugging Face transformers, custom attention): quantizers, pruned weights, activation matmuls, MACs (ours
vs torch's FlopCounterMode), relative BOPs at init, prepare time, and for the first zoo onnxruntime's agreement with
PyTorch on the exported graph (the attention models' ONNX export is a later issue).

    python -m benchmarks.prepare_zoo --csv bench_out/prepare_zoo.csv [--models resnet50 hf_bert ...]

Gates as the zoo export test sets them (a third of the quantizers at 4 bits, the others at 8, about 16 % of the
channels pruned); untrained weights (BN statistics of one batch), so the figures describe the conversion and
export, not accuracy. onnxruntime is compared with the PyTorch eval model on 16 random inputs: the largest logit
difference over the largest logit, the samples that agree to 1e-4 of it, and the samples with the same prediction.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

import bayesian_bits as bb
from bayesian_bits.export import export_model, run_onnxruntime
from tests import attention_zoo, zoo
from tests.checks import ZOO_CONFIG, flop_counter_macs, randomize_gates

from .harness import measure, write_csv

MODELS = [*zoo.ZOO, *attention_zoo.ZOO]


def _float_model(name: str) -> tuple[nn.Module, Tensor]:
    return zoo.zoo_float_model(name) if name in zoo.ZOO else attention_zoo.build(name)


def _onnx_agreement(model: nn.Module, shape: tuple[int, ...]) -> dict:
    randomize_gates(model)
    model.eval()
    xs = torch.rand(16, *shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(xs)
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, "onnx", Path(tmp) / "m.onnx")
        got = run_onnxruntime(str(Path(tmp) / "m.onnx"), xs)
    per_sample = (got - ref).abs().amax(1) / float(ref.abs().max())
    return {"onnx_max_diff_rel": float(per_sample.max()),
            "onnx_exact_samples": f"{int((per_sample <= 1e-4).sum())}/{len(per_sample)}",
            "onnx_same_prediction": f"{int((got.argmax(1) == ref.argmax(1)).sum())}/{len(per_sample)}"}


def row(name: str, repeats: int) -> dict:
    float_model, x = _float_model(name)
    timing = measure(lambda: bb.prepare(float_model, x[:1], ZOO_CONFIG), warmup=1, reps=repeats)
    model = bb.prepare(float_model, x[:1], ZOO_CONFIG)
    torch.manual_seed(0)
    bb.calibrate(model, x)
    report = bb.bop_report(model)
    quantizers = bb.quantizers(model)
    out = {
        "model": name, "input": "x".join(map(str, x.shape[1:])) + ("" if x.is_floating_point() else " tokens"),
        "quantizers": len(quantizers), "pruned_weights": sum(q.gamma_2 is not None for _, q in quantizers),
        "activation_matmuls": sum(r["weight"] is None for r in report["layers"]),
        "macs": report["total_macs"], "macs_flop_counter": flop_counter_macs(float_model, x[:1]),
        "relative_bops_init_pct": round(report["relative_bops"], 3),
        "prepare_ms_median": round(timing.median, 1),
    }
    if name in zoo.ZOO:
        out.update(_onnx_agreement(model, tuple(x.shape[1:])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--repeats", type=int, default=3, help="prepare calls timed per model (median)")
    parser.add_argument("--csv", type=Path, default=Path("bench_out/prepare_zoo.csv"))
    args = parser.parse_args()
    rows = [row(name, args.repeats) for name in args.models]
    for r in rows:
        print(" | ".join(f"{v}" for v in r.values()))
    write_csv(args.csv, rows, "cpu")


if __name__ == "__main__":
    main()
