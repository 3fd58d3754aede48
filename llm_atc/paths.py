"""Where llm-atc keeps its state (``$LLM_ATC_HOME``, default ``~/.llm_atc``), kept private:
folders 0700 and files 0600, whatever the umask, since logs and tasks name models, buckets and hosts.

    registry.db     deployments and training runs (SQLite, numbered migrations)
    credentials.db  API keys of deployments (SQLite)
    tasks/          the SkyPilot task of each launch, without secret values
    local/<name>/   logs and work folders of what runs on this machine
    cache/          checkpoints downloaded for local serving
    checkpoints/    local training runs' models (--checkpoint_store local)
    engines/        engine environments (`llm-atc engines`; $LLM_ATC_ENGINES moves them)
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llm_atc.errors import UserError

DIR_MODE = 0o700
FILE_MODE = 0o600


def home() -> Path:
    """``$LLM_ATC_HOME``, by default ``~/.llm_atc`` (not created here)."""
    return Path(os.environ.get("LLM_ATC_HOME") or Path.home() / ".llm_atc")


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can enter, with any missing parents under ``$LLM_ATC_HOME`` too."""
    root = home()
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current == current.parent:
            break
        current = current.parent
    for folder in reversed(missing):
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
        if folder == root or root in folder.parents:
            os.chmod(folder, DIR_MODE)  # mkdir's mode is masked by the umask
    return path


def create_private(path: Path) -> Path:
    """Make sure the file ``path`` exists with mode 0600 (its folder private too)."""
    private_dir(path.parent)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    os.chmod(path, FILE_MODE)
    return path


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a unique temporary file, then a rename), mode 0600."""
    private_dir(path.parent)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(partial, FILE_MODE)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return path


def open_private(path: Path, mode: str = "ab"):
    """Open ``path`` for writing (appending by default), creating it with mode 0600."""
    create_private(path)
    return path.open(mode)


@contextmanager
def store_errors(path: Path, what: str) -> Iterator[None]:
    """SQLite's "file is not a database" and the like, for the store at ``path``, as one line naming it."""

    try:
        yield
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise
        raise UserError(
            f"the {what} {path} is damaged ({exc}); move it aside (mv {path} {path}.damaged) "
            "and llm-atc starts a new one"
        ) from None
    except PermissionError as exc:
        raise UserError(f"cannot open the {what} {path}: {exc.strerror}") from None
