"""Where things are: the repository, and this Python's bin folder (llm-atc, pytest, moto_server, ...)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
