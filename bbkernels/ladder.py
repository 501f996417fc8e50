"""The bit ladder 2→4→8→16→32 of the residual quantizer and its constants (SPEC B §1.4–1.5): the one place
they are written. The reference, the Triton kernels, the quantizers, the flags, the plots and the exports read
them from here; the C++ header `csrc/bb_quant_math.h` spells them out and tests/test_ladder.py checks it.

Plain Python, no torch: importable from every layer of the project.
"""

from __future__ import annotations

import math
import struct

BITS = (2, 4, 8, 16, 32)  # level k quantizes to BITS[k] bits
GATED_BITS = BITS[1:]  # the levels above 2 bits, each with a gate gamma_{bits} (gamma_4 … gamma_32)
# s_{2b} = s_b / (2^b + 1): the grid step of each level from the one below (5, 17, 257, 65537).
LEVEL_DIVISORS = tuple(2**b + 1 for b in BITS[:-1])
# s_b = s_2 / c_b, c_b the product of the divisors below b (1, 5, 85, 21845, 1431655765).
LEVEL_C = tuple(math.prod(LEVEL_DIVISORS[:k]) for k in range(len(BITS)))
SHRINK = 1 - 1e-7  # pact_clip's factor on x_max (SPEC B §1.4)
SHRINK_FP32: float = struct.unpack("<f", struct.pack("<f", SHRINK))[0]  # 1 − 2^−23: SHRINK rounded to fp32


def level_index(bits: int) -> int:
    """Position of a bit width in the ladder."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return BITS.index(bits)
