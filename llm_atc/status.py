"""The rows of `llm-atc status`: the registry's records, reconciled with what their backends see now."""

from __future__ import annotations

import time

from llm_atc.app.lifecycle import reconcile
from llm_atc.registry import Registry, Status
from llm_atc.ui import escape

_STYLES = {Status.RUNNING: "green", Status.FAILED: "red", Status.LAUNCHING: "yellow"}


def current_rows(
    *, show_all: bool = False, only: str | None = None, registry: Registry | None = None
) -> list[tuple[str, ...]]:
    """Table rows: the newest record per cluster (all records with ``show_all``); ``only``: the
    records whose name or cluster it is."""
    registry = registry or Registry()
    records, seen = [], set()
    for record in registry.records():
        if only is not None and only not in (record.name, record.cluster):
            continue
        key = (record.kind, record.cluster)
        if show_all or key not in seen:
            records.append(record)
        seen.add(key)
    states = reconcile(records, registry)
    rows = []
    for record in records:
        if not show_all and record.status == Status.DOWN:
            continue
        state = states.get(record.id)
        infra = "/".join(p for p in (record.cloud, record.region) if p) or (state.cloud if state else "") or "-"
        shown = record.status
        if state and state.detail and state.detail != record.status:
            shown = f"{record.status} ({state.detail})"
        style = _STYLES.get(record.status)
        shown = escape(shown)
        rows.append(
            (
                escape(", ".join(record.served)),
                _kind(record),
                record.cluster,
                escape(infra),
                escape(record.accelerator or "-"),
                f"[{style}]{shown}[/{style}]" if style else shown,
                (record.endpoint or "-") if record.status == Status.RUNNING else "-",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at)),
            )
        )
    return rows


def _kind(record) -> str:
    """``serve``, with what the models serve besides chat: ``serve (embed)``, ``serve (generate, rerank)``."""
    if record.kind != "serve":
        return record.kind
    tasks = list(dict.fromkeys(record.task_of(name) for name in record.served))
    return record.kind if tasks == ["generate"] else f"serve ({', '.join(tasks)})"
