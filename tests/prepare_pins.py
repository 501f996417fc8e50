"""Pinned results of `prepare` on the CNN zoo and the paper models before capture moved to torch.export: the
quantizers, the dataflow (MACs and where every input slice comes from), BOPs at init and the eval outputs.

`python -m tests.prepare_pins` wrote tests/data/prepare_pins.json with the torch.fx capture (commit f11803f; run
now, it would pin the torch.export capture instead); test_prepare.py compares the current `prepare` against it. The
eval outputs ("logits", "logits_abs") were pinned again when evaluation moved to the deployed arithmetic (issue 24:
one grid step instead of the summed residual levels; outputs differ where an activation sits at a rounding tie).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import bayesian_bits as bb
from bayesian_bits.graph.dataflow import dataflow
from tests import zoo
from tests.checks import ZOO_CONFIG

PINS = Path(__file__).with_name("data") / "prepare_pins.json"
PAPER = {"lenet5quantized": (1, 28, 28), "vggquantized": (3, 32, 32), "resnet18": (3, 64, 64),
         "mobilenetv2": (3, 64, 64)}


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if name in PAPER:
        torch.manual_seed(0)
        model = bb.build_model(name, ZOO_CONFIG, num_classes=10, input_shape=PAPER[name])
        x = torch.rand(4, *PAPER[name], generator=torch.Generator().manual_seed(1))
    else:
        float_model, x = zoo.zoo_float_model(name)
        model = bb.prepare(float_model, x, ZOO_CONFIG)
    torch.manual_seed(0)
    bb.calibrate(model, x)
    return model, x


def values(name: str) -> dict:
    """The pinned quantities of zoo or paper model `name` (JSON-able)."""
    model, x = _model(name)
    flow = dataflow(model)
    layers = {t.name: [t.macs, t.weight, [[s.quantizer, s.bits, s.fraction, s.mask_from] for s in t.inputs]]
              for t in flow.terms if not t.other}
    matmuls = [[t.macs, [[s.quantizer, s.bits, s.fraction] for s in t.inputs],
                [[s.quantizer, s.bits, s.fraction] for s in t.other]] for t in flow.terms if t.other]
    with torch.no_grad():
        logits = model.eval()(x).double()
    return {"quantizers": [n for n, _ in bb.quantizers(model)], "layers": layers, "matmuls": matmuls,
            "total_macs": flow.total_macs, "logits": logits.sum(1).tolist(), "logits_abs": logits.abs().sum(1).tolist(),
            "relative_bops": bb.bop_report(model)["relative_bops"],
            "regions": {k: [list(r.passthrough), list(r.sinks)] for k, r in flow.regions.items()}}


NAMES = [*zoo.ZOO, *PAPER]

if __name__ == "__main__":
    PINS.write_text(json.dumps({name: values(name) for name in NAMES}, indent=1) + "\n")
