"""``python -m bayesian_bits.train [FLAGS]``: the same as ``bayesian-bits train [FLAGS]`` (also under torchrun)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
