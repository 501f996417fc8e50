"""Shared test set-up: Triton runs under its interpreter on CPU tensors when there is no GPU; no model hub; fixtures."""

import os

# Tests never reach the Hugging Face hub (CI has no route to it): a missing file fails at once instead of after
# retries. Read by huggingface_hub at its import, so set before anything imports timm or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels (at import of bbkernels.triton_kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """PyTorch on one thread: its float summation order, and so which rounding ties fall which way, is then the
    same on every machine (see `assert_agrees`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
