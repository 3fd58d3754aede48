"""API keys of deployments, kept only in ``$LLM_ATC_HOME/credentials.db`` (SQLite, mode 0600).

Never in the registry, saved task YAML, logs or normal output: the key reaches the engine as
a SkyPilot secret and is printed only by ``llm-atc endpoint NAME --show_key``. Each save or
removal is one SQLite transaction, so processes saving keys at once lose none.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from pathlib import Path

from llm_atc.paths import create_private, home, store_errors

KEY_PREFIX = "llm-atc-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _path() -> Path:
    return home() / "credentials.db"


def _connect() -> sqlite3.Connection:
    path = _path()
    fresh = not path.exists()
    create_private(path)
    with store_errors(path, "key store"):
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("CREATE TABLE IF NOT EXISTS api_keys (cluster TEXT PRIMARY KEY, key TEXT NOT NULL)")
    if fresh:
        _import_legacy(conn)
    return conn


def _import_legacy(conn: sqlite3.Connection) -> None:
    """Keys saved by llm-atc 0.2 in ``$LLM_ATC_HOME/credentials`` (JSON) move into the database."""
    legacy = home() / "credentials"
    try:
        keys = json.loads(legacy.read_text())
    except (OSError, ValueError):
        return
    if isinstance(keys, dict):
        conn.executemany("INSERT OR IGNORE INTO api_keys VALUES (?, ?)", [(str(c), str(k)) for c, k in keys.items()])
    legacy.unlink(missing_ok=True)


def _run(statement: str, args: tuple) -> list:
    with store_errors(_path(), "key store"):
        conn = _connect()
        try:
            return conn.execute(statement, args).fetchall()
        finally:
            conn.close()


def save(cluster: str, key: str) -> None:
    _run("INSERT OR REPLACE INTO api_keys VALUES (?, ?)", (cluster, key))


def get(cluster: str) -> str | None:
    found = _run("SELECT key FROM api_keys WHERE cluster = ?", (cluster,))
    return found[0][0] if found else None


def forget(cluster: str) -> None:
    _run("DELETE FROM api_keys WHERE cluster = ?", (cluster,))


def clusters() -> list[str]:
    """The clusters that have a key here."""
    return [row[0] for row in _run("SELECT cluster FROM api_keys ORDER BY cluster", ())]
