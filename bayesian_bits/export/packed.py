"""The ``packed`` format: weights as integer codes at their learned bit widths (2/4/8/16 bits packed densely into
bytes; 32-bit and float weights kept as fp32), pruned output channels dropped, grid steps and biases stored.

One file of plain tensors and dicts with a digest (``checkpoint_io``; loads with ``weights_only=True``).
``load_packed`` rebuilds the pruned model of the ``pruned`` format bit for bit: a stored code c decodes as the eval
quantizer applied to (c + offset)·s_b, which lands on the same grid point through the same operator; the per-tensor
offset is the lowest grid index in use, so a b-bit grid fits b bits even where fp32 rounding adds the index ±2^(b−1)
at one end (SPEC B §1.5). Each tensor is checked when written; one that would not decode bit-exactly (possible at
16 bits, where the fp32 residual chain is inexact, SPEC B §1.6) is stored as fp32 instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bbkernels.ladder import BITS

from .. import checkpoint_io
from ..quantizer import Mode
from .loader import Loaded, read_export
from .pruned import ExportPlan, LayerSpec, assemble, export_plan
from .quant import QuantSpec, TensorQuant, spec_entry, spec_from_entry

FORMAT = "bayesian-bits-packed"
VERSION = 4  # 4: the model's other tensors (norms, embeddings, tokens) travel in the file
PACKED_BITS = BITS[:-1]  # every level below 32 bits; 32-bit weights stay fp32


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers < 2^bits → bytes, little-endian, 8/bits values per byte (16 bits: two bytes)."""
    if bits == 16:
        return values.astype("<u2").view(np.uint8)
    per = 8 // bits
    padded = np.zeros(-(-values.size // per) * per, np.uint8)
    padded[: values.size] = values
    lanes = padded.reshape(-1, per)
    return np.bitwise_or.reduce(lanes << (bits * np.arange(per, dtype=np.uint8)), axis=1).astype(np.uint8)


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits`` for ``count`` values."""
    if bits == 16:
        return data.view("<u2")[:count].astype(np.int64)
    per = 8 // bits
    lanes = (data[:, None] >> (bits * np.arange(per, dtype=np.uint8))) & (2**bits - 1)
    return lanes.reshape(-1)[:count].astype(np.int64)


def decode(codes: Tensor, offset: int, spec: QuantSpec, shape: tuple[int, ...]) -> Tensor:
    """Packed codes → the eval weight: the spec's quantizer applied to (code + offset)·s_b."""
    n = unpack_bits(codes.numpy(), spec.bits, int(np.prod(shape))) + offset
    grid = torch.from_numpy(n).float().reshape(shape) * torch.tensor(spec.scale, dtype=torch.float32)
    with torch.no_grad():
        return TensorQuant(spec)(grid)


def encode(weight: Tensor, spec: QuantSpec | None) -> tuple[Tensor, int] | None:
    """Eval weight → packed codes and the offset of code 0 (the lowest grid index), or None when it stays fp32
    (float, 32-bit, more than 2^b grid points in use, or not exactly decodable)."""
    if spec is None or spec.kind is Mode.FLOAT or spec.bits not in PACKED_BITS or not weight.numel():
        return None
    n = torch.round(weight / spec.scale).to(torch.int64)
    offset = int(n.min())
    if int(n.max()) - offset >= 2**spec.bits:
        return None
    codes = torch.from_numpy(pack_bits((n - offset).numpy().reshape(-1), spec.bits))
    return (codes, offset) if torch.equal(decode(codes, offset, spec, tuple(weight.shape)), weight) else None


def pack(loaded: Loaded) -> dict[str, Any]:
    """The packed representation of an eval model."""
    plan = export_plan(loaded)
    layers = []
    for spec in plan.layers:
        encoded = encode(spec.weight, spec.weight_quant)
        codes, offset = encoded if encoded is not None else (None, 0)
        layers.append({
            "name": spec.name,
            "shape": list(spec.weight.shape),
            "weight_quant": spec_entry(spec.weight_quant),
            "scale": None if spec.weight_quant is None else spec.weight_quant.scale,
            "codes": codes,
            "offset": offset,
            "weight": spec.weight if codes is None else None,
            "bias": spec.bias,
            "bias_map": spec.bias_map,
            "act_quant": spec_entry(spec.act_quant),
            "kept": spec.kept,
        })
    return {"format": FORMAT, "version": VERSION, "model": loaded.name, "options": loaded.options,
            "input_shape": list(loaded.input_shape), "layers": layers,
            "quantizers": {name: spec_entry(spec) for name, spec in plan.quantizers.items()}, "state": plan.state}


def export_packed(loaded: Loaded, out: str | Path) -> str:
    """Write the packed file; the summary gives its size next to the checkpoint's and the fp32 weights'."""
    data = pack(loaded)
    checkpoint_io.save(data, out)
    fp32 = sum(4 * (p.numel()) for n, p in loaded.model.state_dict().items() if "quantizer" not in n)
    stored = sum(1 for layer in data["layers"] if layer["codes"] is not None)
    return (f"wrote {out}: {Path(out).stat().st_size:,} bytes ({stored}/{len(data['layers'])} weights as integer "
            f"codes); float checkpoint weights {fp32:,} bytes")


def load_packed(path: str | Path, skeleton: torch.nn.Module | None = None,
                trust_model_code: bool = False) -> torch.nn.Module:
    """Rebuild the pruned eval model from a packed file (see ``loader.read_export`` for ``skeleton``,
    ``trust_model_code`` and errors)."""
    data, skeleton = read_export(path, "packed", FORMAT, VERSION, skeleton, trust_model_code)
    plan = ExportPlan([], {name: spec_from_entry(spec) for name, spec in data["quantizers"].items()}, data["state"])
    for layer in data["layers"]:
        wq = spec_from_entry(layer["weight_quant"])
        shape = tuple(layer["shape"])
        weight = layer["weight"] if layer["codes"] is None else decode(layer["codes"], layer["offset"], wq, shape)
        plan.layers.append(LayerSpec(layer["name"], weight, layer["bias"], layer["bias_map"], wq,
                                     spec_from_entry(layer["act_quant"]), layer["kept"]))
    return assemble(skeleton, plan)
