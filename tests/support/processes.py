"""The processes a test started, found by their process group."""

from __future__ import annotations

import contextlib
import os
import signal

import psutil


def group_of(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of process group ``pgid``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def started_with_home(home: str) -> list[psutil.Process]:
    """The live processes that were started with ``HOME=home`` (a test session's own HOME): what the session
    started, directly or through SkyPilot, Slurm or an engine, and what outlives it if nothing stops it."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("HOME") == home:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def command_line(proc: psutil.Process) -> str:
    """What ``proc`` runs ("" once it is gone)."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def end_leftovers(home: str, *, grace: float = 15) -> list[str]:
    """Stop what is still running with ``HOME=home`` (after ``grace`` seconds to end by itself): SIGTERM, then
    SIGKILL. The command lines of those that were still there."""
    gone, alive = psutil.wait_procs(started_with_home(home), timeout=grace)
    described = []
    for proc in alive:
        try:
            described.append(f"{proc.pid}: {command_line(proc)[:200]}")
            proc.terminate()
        except psutil.Error:
            continue
    _, still = psutil.wait_procs(alive, timeout=10)
    for proc in still:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return described


def tear_down_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, a CI runner giving up) end a pytest session as Ctrl-C does: its fixtures' teardown
    and ``pytest_sessionfinish`` still run, so the servers the session started are stopped, not orphaned."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
