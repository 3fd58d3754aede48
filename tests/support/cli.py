"""Running ``llm-atc`` in-process and checking what a user would see."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path


def unique(prefix: str) -> str:
    return f"{prefix}-{time.time_ns() % 10**10}"


class CLIResult:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.exit_code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self):
        return f"<exit {self.exit_code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}>"


def assert_one_line_error(result: CLIResult, *fragments: str) -> None:
    """A user mistake: non-zero exit, one ``Error:`` line naming the problem, no traceback of ours.

    Progress lines may come before it; an engine's own log tail may follow it.
    """
    assert result.exit_code != 0, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("Error: ")]
    assert len(errors) == 1, result
    assert not any("Traceback" in line for line in lines[: errors[0] + 1]), result
    assert "Traceback" not in result.stdout
    for fragment in fragments:
        assert fragment in lines[errors[0]], result


@contextmanager
def using_home(path: Path):
    """``$LLM_ATC_HOME`` set to ``path`` inside the block (for session-wide state)."""
    before = os.environ.get("LLM_ATC_HOME")
    os.environ["LLM_ATC_HOME"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("LLM_ATC_HOME", None)
        else:
            os.environ["LLM_ATC_HOME"] = before


def run_cli(*args: str) -> CLIResult:
    from click.testing import CliRunner

    from llm_atc.cli import cli as command

    result = CliRunner(mix_stderr=False).invoke(command, list(args), catch_exceptions=False, prog_name="llm-atc")
    return CLIResult(result.exit_code, result.stdout, result.stderr)
