"""The exceptions the CLI turns into one line on stderr and an exit code (2 unless the error says otherwise)."""


class GteError(Exception):
    """A user-facing error: bad input, a missing file, an impossible configuration."""

    exit_code = 2


class Interrupted(GteError):
    """SIGINT/SIGTERM: a checkpoint was saved; the exit code is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
