"""Errors that the command line reports as a one-line message with exit status 2."""


class UsageError(Exception):
    """A bad invocation: the message names the offending argument and the fix."""


class DataError(UsageError):
    """A dataset that is missing or damaged: the message says what was looked for and how to provide it."""
