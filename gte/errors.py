"""The one exception type the CLI turns into a one-line error with exit code 2."""


class GteError(Exception):
    """A user-facing error: bad input, a missing file, an impossible configuration."""
