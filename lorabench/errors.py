"""The one exception type for bad user input; the CLI turns it into one line and exit code 2."""


class LorabenchError(ValueError):
    """A user-facing error: bad model, method, rank, dtype or config.

    The message is a complete sentence meant to be printed as is.
    """
