"""``llm-atc top``: what each running engine is doing, from its own ``/metrics``, reached the way ``endpoint``
reaches it (the API key, HTTPS with the deployment's certificate, an SSH tunnel for a private endpoint, the gateway
for several models, each replica of a service that can be reached from here)."""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial

from llm_atc import credentials, metrics
from llm_atc.app import lifecycle
from llm_atc.app.lifecycle import reconcile
from llm_atc.backends import backend_for
from llm_atc.errors import NotFoundError
from llm_atc.readiness import trusting
from llm_atc.registry import Record, Registry, Status

HISTORY = 24  # samples kept per row, for its sparkline


@dataclass
class Engine:
    """One row: an engine of a deployment, and how to read its metrics (``url`` None: it has none to read)."""

    deployment: str
    model: str
    url: str | None
    api_key: str | None = field(default=None, repr=False)
    cafile: str | None = None
    price_per_hour: float | None = None
    note: str = ""  # why there are no figures (transformers serve, an unreachable replica)
    last: metrics.Sample | None = None
    history: list[float] = field(default_factory=list)  # output tokens/s of the last windows

    def read(self) -> metrics.Sample | None:
        if self.url is None:
            return None
        request = urllib.request.Request(self.url)
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=5, context=trusting(self.cafile)) as response:
                return metrics.parse(response.read().decode(errors="replace"))
        except OSError as exc:
            self.note = f"no answer from {self.url.rsplit('/metrics', 1)[0]} ({type(exc).__name__})"
            return None


@dataclass
class Row:
    """What ``top`` shows (and ``--json`` prints) of one engine for the last window."""

    deployment: str
    model: str
    note: str
    window: metrics.Window | None
    trend: str = ""

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"deployment": self.deployment, "model": self.model, "note": self.note,
                "window": asdict(self.window) if self.window else None, "trend": self.trend}  # fmt: skip


def running(names: tuple[str, ...], registry: Registry) -> list[Record]:
    """The RUNNING deployments to watch: those named (a one-line error for a name nothing has), else all."""

    records = [registry.find(name, kind="serve") for name in names] if names else registry.records(kind="serve")
    if not names:
        newest: dict[str, Record] = {}
        for record in records:
            newest.setdefault(record.cluster, record)
        records = list(newest.values())
    reconcile(records, registry)
    found = [record for record in records if record.status == Status.RUNNING]
    if names and not found:
        raise NotFoundError(f"{', '.join(names)}: not running (see `llm-atc status`)")
    return found


@contextmanager
def engines(records: list[Record], registry: Registry) -> Iterator[list[Engine]]:
    """Every engine of ``records`` with the URL of its metrics; tunnels to private endpoints stay open inside."""

    with ExitStack() as stack:
        found: list[Engine] = []
        for record in records:
            key, cafile = credentials.get(record.cluster), record.details.get("tls_cert")
            price = record.price.get("per_hour")
            common = partial(Engine, deployment=record.cluster, api_key=key, cafile=cafile, price_per_hour=price)
            if (record.engine or "vllm") != "vllm":
                found.append(common(model=record.name, url=None, note="transformers serve exports no metrics"))
                continue
            if record.mode == "service":
                found += _replicas(record, common)
                continue
            if record.details.get("private"):
                from llm_atc.tunnel import forward

                base = stack.enter_context(forward(record)).endpoint
            else:
                base = lifecycle.endpoint(record, registry=registry)[1]
            several = len(record.served) > 1
            for name in record.served:
                url = f"{base.rstrip('/')}/metrics" + (f"?model={urllib.parse.quote(name, safe='')}" if several else "")
                found.append(common(model=name, url=url))
        yield found


def _replicas(record: Record, common: Callable[..., Engine]) -> list[Engine]:
    """A service's ready replicas, each read directly where this machine reaches it (``common``: an Engine
    with the deployment's key, certificate and price)."""

    replicas = backend_for(record).ready_replicas(record)
    if not replicas:
        return [common(model=record.name, url=None, note="no ready replica")]
    return [common(model=f"{record.name} (replica {rid})", url=f"{url.rstrip('/')}/metrics") for rid, url in replicas]


def sample(found: list[Engine]) -> list[Row]:
    """Read every engine once; each row is the window since its previous read (none on the first)."""
    rows = []
    for engine in found:
        current = engine.read()
        window = None
        if current is not None:
            engine.note = ""
            if engine.last is not None:
                window = metrics.window(engine.last, current, engine.price_per_hour)
                engine.history = (engine.history + [window.output_tokens_per_second])[-HISTORY:]
            engine.last = current
        rows.append(Row(engine.deployment, engine.model, engine.note, window, metrics.sparkline(engine.history)))
    return rows
