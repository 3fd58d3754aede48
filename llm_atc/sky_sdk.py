"""SkyPilot's client SDK, imported on first use with usage collection off (unless the user chose otherwise), and
quiet while llm-atc asks it things in the background. Only this module imports ``sky`` for llm-atc's own code;
``backends.skypilot`` (workloads) and ``catalog`` (the GPU catalog) use it."""

from __future__ import annotations

import contextlib
import io
import os
import re

USAGE_ENV = "SKYPILOT_DISABLE_USAGE_COLLECTION"


def import_sky():
    """``import sky`` with usage collection off (unless the user chose otherwise)."""
    os.environ.setdefault(USAGE_ENV, "1")
    import sky

    return sky


class quiet_sky:
    """Keep SkyPilot's own output off the terminal while llm-atc asks it something in the background (a
    catalog read, a cluster lookup): its log lines ("Starting a local server", "API server stopped") and
    the ``<sky-payload>`` progress messages it prints on stdout go nowhere; errors still raise."""

    def __enter__(self):
        import logging

        self._logger = logging.getLogger("sky")
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL)
        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        self._logger.setLevel(self._level)
        return False


def uncoloured(text: str) -> str:
    """``text`` without terminal colour codes (SkyPilot colours messages and logs)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in uncoloured(str(exc)).splitlines() if line.strip()]
    text = " ".join(lines[:3])
    if len(text) > 400:
        text = f"{text[:200]}...{text[-200:]}"
    return text or type(exc).__name__
