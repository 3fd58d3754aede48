"""API keys of deployments, kept only in ``$LLM_ATC_HOME/credentials`` (JSON, mode 0600).

Never in the registry, saved task YAML, logs or normal output: the key reaches the
engine as a SkyPilot secret and is printed only by ``llm-atc endpoint NAME --show_key``.
"""

from __future__ import annotations

import json
import os
import secrets

from llm_atc.registry import home

KEY_PREFIX = "llm-atc-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _path():
    return home() / "credentials"


def _load() -> dict[str, str]:
    path = _path()
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def _store(keys: dict[str, str]) -> None:
    path = _path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(".credentials.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(keys, handle, indent=1, sort_keys=True)
    os.chmod(partial, 0o600)
    partial.replace(path)


def save(cluster: str, key: str) -> None:
    _store({**_load(), cluster: key})


def get(cluster: str) -> str | None:
    return _load().get(cluster)


def forget(cluster: str) -> None:
    keys = _load()
    if keys.pop(cluster, None) is not None:
        _store(keys)
