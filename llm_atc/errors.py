"""Errors that reach the user as one line, without a traceback."""


class UserError(Exception):
    """A mistake in what the user asked for, or a state they can fix.

    The CLI prints ``Error: <message>`` and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class NotFoundError(UserError):
    """A deployment, run, cluster, bucket or object that does not exist."""

    exit_code = 3


class LaunchError(UserError):
    """SkyPilot or the engine failed after we handed it a valid request."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
