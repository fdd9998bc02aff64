"""The one exception type for bad input from the user (config, data, checkpoints, files)."""


class UserError(ValueError):
    """A problem with what the user gave us; the message names it and the fix, on one line.

    Entry points print it without a traceback and exit with status 2.
    """


class RunStopped(Exception):
    """Training cannot usefully go on (its losses stay non-finite); the message says which
    checkpoint is good and what to change. Entry points print it and exit with status 3."""
