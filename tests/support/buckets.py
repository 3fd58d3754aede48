"""Helpers for the S3 and GCS emulators."""

from __future__ import annotations

import re
from pathlib import Path


def weight_reads(moto_log: Path, key: str) -> list[str]:
    """moto's log lines for GETs of ``bucket/key`` (boto3 sends the path, the streamer's C++ client the
    whole URL)."""
    request = re.compile(r'"GET (https?://[^/ ]+)?/' + re.escape(key) + r" HTTP")
    return [line for line in moto_log.read_text().splitlines() if request.search(line)]


def upload_folder(folder: Path, put) -> None:
    """Upload every file of ``folder`` with ``put(relative_name, path)``."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            put(str(path.relative_to(folder)), path)
