"""What libraries log (SkyPilot, huggingface_hub, transformers, urllib3, ...) goes to llm-atc's log file, not to
the terminal: a user sees llm-atc's own lines, and an error names the file that has the details.

``$LLM_ATC_HOME/logs/llm-atc.log`` (private, like everything under $LLM_ATC_HOME), appended to by every command.
SkyPilot's own handlers stay: its provisioning logs during a launch are progress the user asked for.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from llm_atc.paths import create_private, home, open_private

_configured = False


def log_path() -> Path:

    return home() / "logs" / "llm-atc.log"


class _PrivateFileHandler(logging.FileHandler):
    """A FileHandler whose file is created private (0600, in a 0700 folder) when first written."""

    def _open(self):

        create_private(Path(self.baseFilename))
        return super()._open()


def keep_library_logs() -> None:
    """Send warnings and errors that libraries log (and Python's warnings) to the log file instead of the
    terminal: with a handler on the root logger, Python's last-resort stderr handler is never used."""
    global _configured
    if _configured:
        return
    _configured = True
    root = logging.getLogger()
    if any(getattr(handler, "_llm_atc", False) for handler in root.handlers):
        return
    handler = _PrivateFileHandler(log_path(), delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.WARNING)
    handler._llm_atc = True
    root.addHandler(handler)
    logging.captureWarnings(True)


def log_exception(exc: BaseException) -> Path:
    """Append ``exc``'s traceback to the log file; its path, for the error line to name."""

    path = log_path()
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    with open_private(path) as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} llm-atc unexpected error\n{text}\n".encode())
    return path


def to_log_file(library: str) -> None:
    """Take the terminal handler a library put on its own logger (huggingface_hub and transformers add one when
    imported): its records still reach the log file through the root logger."""
    logger = logging.getLogger(library)
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:
            logger.removeHandler(handler)
