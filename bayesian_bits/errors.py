"""The library's errors; the command line reports each as one line (exit status 2, or 1 for ``NonFiniteError``)."""


class UsageError(ValueError):
    """A bad argument or input: the message names it and the fix."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker's error is re-raised in the main process as this class built from its whole traceback
        # ("Caught DataError in DataLoader worker process 0. Original Traceback ... DataError: <message>"): keep
        # <message>, the line written for the user.
        if "Original Traceback" in message:
            message = message.rstrip().rpartition(f"{type(self).__name__}: ")[2]
        super().__init__(message)


class DataError(UsageError):
    """A dataset that is missing or damaged: the message says what was looked for and how to provide it."""


class CheckpointError(UsageError):
    """A checkpoint or export file that is missing, unreadable, damaged or not written by bayesian-bits."""


class WriteError(UsageError):
    """A file that cannot be written (read-only folder, a folder in the way, full disk): names path and fix."""


class ModelCodeError(CheckpointError):
    """A model spec read from a file that names code to import (``package.module:callable``), not confirmed by the
    user: a file never chooses code to run (SPEC A10)."""


class NonFiniteError(ValueError):
    """NaN or infinite values where finite ones are needed (a diverged run, a damaged model)."""
