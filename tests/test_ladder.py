"""The bit ladder is described once (bbkernels/ladder.py): every consumer agrees with it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesian_bits.config import QuantConfig
from bayesian_bits.export import packed, quant
from bayesian_bits.pipeline import options
from bayesian_bits.quantizer import LEVEL_BITS, LEVEL_NAMES, BayesianBitsQuantizer
from bbkernels import ladder, reference

HEADER = Path(ladder.__file__).parent / "csrc" / "bb_quant_math.h"


def test_ladder_constants_follow_from_the_bit_widths():
    assert ladder.BITS == tuple(2 << k for k in range(len(ladder.BITS)))  # doubling from 2 (the header assumes it)
    assert ladder.GATED_BITS == ladder.BITS[1:]
    for k, d in enumerate(ladder.LEVEL_DIVISORS):
        assert d == 2 ** ladder.BITS[k] + 1
    for k, c in enumerate(ladder.LEVEL_C):
        assert 3 * c == 2 ** ladder.BITS[k] - 1  # s_b = s_2 / c_b: the b-bit grid has 2^b − 1 steps over 3·s_2
    assert ladder.SHRINK_FP32 == float(np.float32(ladder.SHRINK)) == 1 - 2**-23
    assert ladder.level_index(8) == 2
    with pytest.raises(ValueError, match="bits must be one of"):
        ladder.level_index(3)


def test_reference_reads_the_ladder():
    assert (reference.BITS, reference.LEVEL_DIVISORS, reference.LEVEL_C, reference.SHRINK) == (
        ladder.BITS, ladder.LEVEL_DIVISORS, ladder.LEVEL_C, ladder.SHRINK)
    steps = reference.scales(torch.tensor([3.0], dtype=torch.float64), signed=False)
    assert len(steps) == len(ladder.BITS)
    for s, c in zip(steps, ladder.LEVEL_C, strict=True):
        assert float(steps[0] / s) == pytest.approx(c, rel=1e-12)


def test_triton_constants_are_the_ladder():
    pytest.importorskip("triton")
    from bbkernels import triton_kernels as tk

    assert tk.N_LEVELS.value == len(ladder.BITS)
    assert tk.DIVISORS.value == tuple(float(d) for d in ladder.LEVEL_DIVISORS)
    assert tk.INV_C.value == tuple(1.0 / c for c in ladder.LEVEL_C)
    assert tk.SHRINK.value == ladder.SHRINK_FP32
    assert tk.N_PARTIALS.value == len(ladder.GATED_BITS) + 2  # dx_max, one per gate, dg2


def _header_array(text: str, name: str) -> tuple[float, ...]:
    body = re.search(rf"\b{name}\[[^\]]*\]\s*=\s*\{{([^}}]*)\}}", text)
    assert body, f"{name}[] not found in {HEADER.name}"
    return tuple(float(v.strip().rstrip("f")) for v in body.group(1).split(","))


def test_cpp_header_constants_equal_the_ladder():
    text = HEADER.read_text()
    assert int(re.search(r"constexpr int kLevels = (\d+);", text).group(1)) == len(ladder.BITS)
    accumulators = int(re.search(r"constexpr int kAccumulators = (\d+);", text).group(1))
    assert accumulators == 2 * len(ladder.BITS) + 1  # Σg·clipsign, Σg·e_k, Σg·u_{k+1}, Σg·z
    assert _header_array(text, "div") == tuple(float(d) for d in ladder.LEVEL_DIVISORS)
    assert _header_array(text, "c") == tuple(float(c) for c in ladder.LEVEL_C)
    shrink = re.search(r"const float shrink = 1\.0f - ([0-9.e+-]+)f;", text)
    assert float(np.float32(1.0) - np.float32(shrink.group(1))) == ladder.SHRINK_FP32
    assert "(2 << first) != fixed_bits" in text  # the header finds a bit width's level as 2 << k


def test_quantizer_has_one_gate_per_gated_level():
    assert LEVEL_BITS == ladder.GATED_BITS
    q = BayesianBitsQuantizer(channels=3).eval()
    names = [n for n in LEVEL_NAMES if getattr(q, n).shape == (1,)]
    assert names == [f"gamma_{b}" for b in ladder.GATED_BITS]  # the names of checkpoints before the gate bank
    assert q.gammas.shape == q.alive.shape == (len(ladder.GATED_BITS),)
    for on in range(len(ladder.BITS)):
        with torch.no_grad():
            for k, b in enumerate(ladder.GATED_BITS):
                getattr(q, f"gamma_{b}").fill_(6.0 if k < on else -6.0)
        assert q.bit_width() == ladder.BITS[on]


def test_config_and_flags_cover_the_gated_levels():
    config = QuantConfig(**{f"gamma_{b}_init": float(b) for b in ladder.GATED_BITS})
    assert config.gamma_inits == tuple(float(b) for b in ladder.GATED_BITS)
    parser = argparse.ArgumentParser()
    options.add_train_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings if re.fullmatch(r"--gamma-\d+-init", s)}
    assert flags == {f"--gamma-{b}-init" for b in ladder.GATED_BITS}


@pytest.mark.parametrize("signed", [False, True])
def test_export_encodings_follow_the_ladder(signed):
    assert packed.PACKED_BITS == ladder.BITS[:-1]
    steps = reference.scales(torch.tensor(5.0), signed)
    for k, b in enumerate(ladder.BITS):
        spec = quant.QuantSpec("gated", b, signed, 5.0)
        assert spec.scale == float(steps[k])
        assert spec.grid.hi == float(torch.tensor(5.0) * torch.tensor(ladder.SHRINK, dtype=torch.float32))
        if b < 32:  # ±(2^(b−1)−1) (fp32 rounding of s_b may carry it to ±2^(b−1)) or 0…2^b−1 (SPEC B §1.5)
            lo, hi = spec.grid.codes
            assert (lo, hi) == (-hi, hi) and hi in (2 ** (b - 1) - 1, 2 ** (b - 1)) if signed else (lo, hi) == (
                0, 2**b - 1)
