"""The rows of `llm-atc status`: the registry's records, reconciled with what their backends see now, with what
each costs so far."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from llm_atc import credentials
from llm_atc.app import cost
from llm_atc.app.lifecycle import reconcile
from llm_atc.app.top import Engine
from llm_atc.metrics import names
from llm_atc.registry import Record, Registry, Status
from llm_atc.spec import Limits
from llm_atc.ui import escape

_STYLES = {Status.RUNNING: "green", Status.FAILED: "red", Status.LAUNCHING: "yellow"}
RECENT = 24 * 3600  # a deployment that ended by itself stays in `status` this long (without -a)


@dataclass
class Row:
    """One line of `status` (and one object of `status --json`)."""

    name: str
    kind: str
    cluster: str
    infra: str
    accelerator: str
    status: str
    detail: str
    endpoint: str
    created: float
    up_seconds: float
    price_per_hour: float | None
    price_source: str
    cost_so_far: float | None
    ends: str
    load: str = ""  # requests running and waiting now, where reading them is cheap (this machine's vLLM)

    def cells(self) -> tuple[str, ...]:
        """The table's columns, marked up for the terminal."""
        shown = escape(f"{self.status} ({self.detail})" if self.detail else self.status)
        style = _STYLES.get(self.status)
        price = "own hw" if self.price_source == cost.OWN_HARDWARE else _money(self.price_per_hour)
        return (
            escape(self.name),
            self.kind,
            self.cluster,
            escape(self.infra),
            escape(self.accelerator),
            f"[{style}]{shown}[/{style}]" if style else shown,
            self.endpoint,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created)),
            _duration(self.up_seconds),
            price,
            "-" if self.cost_so_far is None else f"${self.cost_so_far:.2f}",
            self.load or "-",
        )

    def to_dict(self) -> dict:
        return asdict(self)


COLUMNS = (
    "NAME", "KIND", "CLUSTER", "INFRA", "ACCELERATOR", "STATUS", "ENDPOINT", "CREATED", "UP", "$/H", "COST", "LOAD"
)  # fmt: skip


def current_rows(
    *, show_all: bool = False, only: str | None = None, registry: Registry | None = None
) -> list[tuple[str, ...]]:
    """Table rows (see :func:`rows`)."""
    return [row.cells() for row in rows(show_all=show_all, only=only, registry=registry)]


def rows(*, show_all: bool = False, only: str | None = None, registry: Registry | None = None) -> list[Row]:
    """The newest record per cluster (all records with ``show_all``), reconciled; ``only``: the records whose
    name or cluster it is. Torn-down deployments are left out, but for those that ended by themselves lately."""
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
    now = time.time()
    found = []
    for record in records:
        if record.status == Status.DOWN and not show_all and not _ended_lately(record, now):
            continue
        state = states.get(record.key) if record.id is not None else None
        infra = "/".join(p for p in (record.cloud, record.region) if p) or (state.cloud if state else "") or "-"
        detail = state.detail if state and state.detail else record.details.get("ended", "")
        up, spent = cost.up_and_cost(record, now)
        price = record.price
        found.append(
            Row(
                name=", ".join(record.served),
                kind=_kind(record),
                cluster=record.cluster,
                infra=infra,
                accelerator=record.accelerator or "-",
                status=record.status,
                detail="" if detail == record.status else detail,
                endpoint=(record.endpoint or "-") if record.status == Status.RUNNING else "-",
                created=record.created_at,
                up_seconds=round(up),
                price_per_hour=price.get("per_hour"),
                price_source=price.get("source", ""),
                cost_so_far=spent,
                ends=_ends(record),
                load=_load(record),
            )
        )
    return found


def _load(record: Record) -> str:
    """``2 running, 1 waiting`` from one read of the engines' metrics, for a vLLM deployment on this machine (a
    cluster's would cost a round trip each: `llm-atc top` reads those)."""
    serving = record.kind == "serve" and record.status == Status.RUNNING and bool(record.endpoint)
    if not (serving and record.is_local and (record.engine or "vllm") == "vllm"):
        return ""
    from urllib.parse import quote

    several = len(record.served) > 1
    running = waiting = 0.0
    for model in record.served:
        query = f"?model={quote(model, safe='')}" if several else ""
        engine = Engine(record.cluster, model, f"{record.endpoint}/metrics{query}", credentials.get(record.cluster),
                        record.details.get("tls_cert"))  # fmt: skip
        sample = engine.read()
        if sample is None:
            return ""
        running += sample.total(names()["running"])
        waiting += sample.total(names()["waiting"])
    return f"{running:g} running, {waiting:g} waiting"


def _ended_lately(record: Record, now: float) -> bool:
    return bool(record.details.get("ended")) and now - record.updated_at < RECENT


def _ends(record: Record) -> str:
    """How it ends by itself, as the confirmation said."""

    limits = Limits(**(record.details.get("limits") or {}))
    return limits.text("when the run ends" if record.kind == "train" else "when you run `llm-atc down`")


def _kind(record) -> str:
    """``serve``, with what the models serve besides chat: ``serve (embed)``, ``serve (generate, rerank)``."""
    if record.kind != "serve":
        return record.kind
    tasks = list(dict.fromkeys(record.task_of(name) for name in record.served))
    return record.kind if tasks == ["generate"] else f"serve ({', '.join(tasks)})"


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:.2f}"


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours < 48 else f"{hours // 24}d{hours % 24:02d}h"
