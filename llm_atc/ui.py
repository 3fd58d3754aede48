"""Terminal output: progress on stderr, results on stdout.

Keeping progress off stdout lets ``--dryrun`` print nothing but the task YAML and
lets scripts capture the endpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console, RenderableType

_err = Console(stderr=True, highlight=False, soft_wrap=True)
# Off a terminal rich would wrap tables at 80 columns; scripts and logs get full rows.
_out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
_quiet = False
# Exit codes, one meaning each (docs/cli.md): 0 done, 1 failed after launching, 2 bad input or a state
# that refuses it, 3 not found, 4 not confirmed, 128+N interrupted by signal N.
NOT_CONFIRMED = 4


def set_quiet(quiet: bool) -> None:
    """Silence progress messages."""
    global _quiet
    _quiet = quiet


@contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """Silence progress messages inside the block (the Python API's default)."""
    before = _quiet
    set_quiet(on)
    try:
        yield
    finally:
        set_quiet(before)


def stderr_console() -> Console:
    return _err


def stdout_console() -> Console:
    return _out


def is_quiet() -> bool:
    return _quiet


def info(message: str) -> None:
    if not _quiet:
        _err.print(message)


def warn(message: str) -> None:
    _err.print(f"[yellow]Warning:[/yellow] {message}")


def error(message: str) -> None:
    _err.print(f"[red]Error:[/red] {message}", markup=True)


def out(text: RenderableType = "", **kwargs) -> None:
    """Print a result to stdout."""
    _out.print(text, **kwargs)


def raw_out(text: str) -> None:
    """Write text to stdout exactly as given (YAML, JSON, logs)."""
    sys.stdout.write(text)
    sys.stdout.flush()


@contextmanager
def spinner(message: str) -> Iterator[Spinner]:
    """A rich spinner on stderr showing ``message`` (plain text, not markup) and the elapsed time."""
    message = escape(message)
    handle = Spinner(message)
    if _quiet or not _err.is_terminal:
        info(message)
        yield handle
        return
    with _err.status(message) as status:
        handle._status = status
        yield handle


class Spinner:
    def __init__(self, message: str):
        self.message = message
        self._status = None

    def update(self, elapsed: float, detail: str = "") -> None:
        if self._status is not None:
            suffix = f" [dim]{escape(detail)}[/dim]" if detail else ""
            self._status.update(f"{self.message} ({elapsed:.0f}s){suffix}")


def confirm(question: str, *, yes: bool) -> bool:
    """Ask on the terminal unless ``-y`` was given; without a terminal, refuse."""
    if yes:
        return True
    if not sys.stdin.isatty():
        error(f"{question} Pass -y to confirm without a terminal.")
        return False
    return _err.input(f"{question} [y/N]: ").strip().lower() in ("y", "yes")


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(text)
