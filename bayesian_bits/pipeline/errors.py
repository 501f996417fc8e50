"""The command line's errors (defined in ``bayesian_bits.errors``, which the library raises)."""

from ..errors import DataError, UsageError

__all__ = ["DataError", "UsageError"]
