"""Shared test set-up: Triton runs under its interpreter on CPU tensors when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels (at import of bbkernels.triton_kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")
