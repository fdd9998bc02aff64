"""The one exception type for bad input from the user (config, data, checkpoints, files)."""


class UserError(ValueError):
    """A problem with what the user gave us; the message names it and the fix, on one line.

    Entry points print it without a traceback and exit with status 2.
    """
