"""A run stopped as Ctrl-C stops it: the shared helper of the resume tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from bayesian_bits.pipeline import runner


@contextmanager
def interrupted_in_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int = 2) -> Iterator[None]:
    """Inside the block, a training run gets KeyboardInterrupt when its `epoch`-th epoch starts (exit status 130,
    `last.pth` holding the epochs before it)."""
    real, calls = runner.train_epoch, []

    def cut(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "train_epoch", cut)
        yield
