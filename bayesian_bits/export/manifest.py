"""The ``manifest`` format: JSON with every quantized tensor's eval bit width, signedness, grid step and range,
the kept output channels, and MACs/BOPs per layer and in total (from ``bop_report``, SPEC B §3.5–3.6)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint_io
from ..bops import bop_report
from ..quantizer import quantizers
from .graph import regions
from .loader import Loaded
from .quant import spec_of


def tensor_entry(q: nn.Module) -> dict[str, Any]:
    """One quantized tensor: kind, eval bit width, signedness, x_max, grid step s_b and kept output channels."""
    spec = spec_of(q)
    mask = q.keep_mask()
    return {
        "kind": spec.kind,
        "bits": spec.bits,
        "signed": spec.signed,
        "x_max": spec.x_max,
        "scale": spec.scale,
        "channels": None if mask is None else int(mask.numel()),
        "kept_channels": None if mask is None else torch.nonzero(mask).flatten().tolist(),
        # False only in fixed-bit mode without prune-only: BOPs count the mask, the forward ignores it (§1.11).
        "pruning_applied": q.applied_mask() is not None,
    }


def manifest(loaded: Loaded) -> dict[str, Any]:
    """The manifest of an eval model: per layer its MACs, BOPs, bits and quantized tensors; totals as reported."""
    model = loaded.model
    report = bop_report(model)
    removable = regions(model).by_output
    layers = []
    modules = dict(model.named_modules())
    for row in report["layers"]:
        layer = modules.get(row["name"])  # None for a matmul of two activations
        entry = {k: row[k] for k in ("name", "macs", "input_bits", "weight_bits", "act_bits", "kept_out_pct",
                                     "kept_in_pct")}
        entry["bops"] = row["gbops"] * 1e9
        # Whether the pruned/packed/onnx exports drop the channels its pruning (or its input's) removes; channels
        # that feed a residual add stay there with zero weights.
        entry["channels_removed_on_export"] = row["name"] in removable
        for kind in ("weight", "act"):
            q = getattr(layer, f"{kind}_quantizer", None)
            entry[kind] = None if q is None else tensor_entry(q)
        layers.append(entry)
    grouped = {f"{row['name']}.{kind}_quantizer" for row in report["layers"] for kind in ("weight", "act")}
    return {
        "model": loaded.name,
        "bop_input_shape": list(loaded.mac_shape),
        "relative_bops": report["relative_bops"],
        "bops": report["gbops"] * 1e9,
        "bops_baseline": report["gbops_baseline"] * 1e9,
        "total_macs": report["total_macs"],
        "layers": layers,
        # Quantizers outside BOP accounting (tensors feeding residual adds, §4.2); still in the forward pass.
        "ungrouped_tensors": {n: tensor_entry(q) for n, q in quantizers(model) if n not in grouped},
    }


def export_manifest(loaded: Loaded, out: str | Path) -> str:
    """Write the manifest as indented JSON."""
    data = manifest(loaded)
    text = json.dumps(data, indent=1) + "\n"
    data_bytes = text.encode()
    checkpoint_io.write_atomic(out, lambda fh: fh.write(data_bytes), size=len(data_bytes))
    return f"wrote {out}: {len(data['layers'])} layers, relative BOPs {data['relative_bops']:.2f} %"
