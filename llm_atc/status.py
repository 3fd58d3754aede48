"""Reconcile registry records with what their backends see now."""

from __future__ import annotations

import time

from llm_atc.backends import LiveState, backend_for
from llm_atc import ui
from llm_atc.ui import escape
from llm_atc.registry import Record, Registry, Status

_STYLES = {Status.RUNNING: "green", Status.FAILED: "red", Status.LAUNCHING: "yellow"}


def refresh(records: list[Record], registry: Registry) -> dict[int, LiveState]:
    """Live states by record id; records whose state changed are updated in the registry."""
    by_backend: dict[str, list[Record]] = {}
    for record in records:
        if record.kind == "serve" and record.status not in (Status.DOWN,):
            by_backend.setdefault("local" if record.is_local else "skypilot", []).append(record)
    states: dict[int, LiveState] = {}
    for kind, group in by_backend.items():
        if kind == "local":
            states.update(backend_for(group[0]).states(group))
            continue
        with ui.spinner("Asking SkyPilot about the clusters (starts its API server the first time)"):
            states.update(backend_for(group[0]).states(group))
    for record in records:
        state = states.get(record.id)
        if state is not None and state.status != record.status:
            registry.update(record, status=state.status)
    return states


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
    states = refresh(records, registry)
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
                escape(record.name),
                record.kind,
                record.cluster,
                escape(infra),
                escape(record.accelerator or "-"),
                f"[{style}]{shown}[/{style}]" if style else shown,
                (record.endpoint or "-") if record.status == Status.RUNNING else "-",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at)),
            )
        )
    return rows
