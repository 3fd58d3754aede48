"""What the Python API's handles (Deployment, TrainingRun) share: a registry record, reconciled."""

from __future__ import annotations

from llm_atc import ui
from llm_atc.app.cost import up_and_cost
from llm_atc.app.lifecycle import end, reconcile
from llm_atc.errors import UserError
from llm_atc.registry import Record, Registry, Status


class RecordHandle:
    """A live view of one registry record."""

    def __init__(self, record: Record, registry: Registry | None = None):
        self.record = record
        self._registry = registry or Registry()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, cluster={self.cluster!r}, status={self.record.status!r})"

    @property
    def name(self) -> str:
        """The deployment's served model name, or the run's name."""
        return self.record.name

    @property
    def cluster(self) -> str:
        return self.record.cluster

    def status(self) -> str:
        """The record's status, reconciled with its backend (what `llm-atc status` shows)."""

        reconcile([self.record], self._registry)
        return self.record.status

    def cost(self) -> dict:
        """How long it has been up, its hourly price and what it has cost so far (what `llm-atc status` shows):
        ``{"up_seconds", "price_per_hour", "price_source", "cost_so_far"}``; a price is None where not known."""

        self.status()
        seconds, spent = up_and_cost(self.record)
        price = self.record.price
        return {
            "up_seconds": round(seconds),
            "price_per_hour": price.get("per_hour"),
            "price_source": price.get("source", ""),
            "cost_so_far": spent,
        }

    def stop(self) -> None:
        """Stop it, keeping what it needs to go on (idempotent)."""
        self._end("stop")

    def down(self) -> None:
        """End it for good: its cluster or process, its API key; the name is free again."""
        self._end("down")

    def _end(self, action: str) -> None:

        if action == "stop" and self.record.status in (Status.STOPPED, Status.FAILED, Status.DOWN):
            return
        with ui.quiet():
            try:
                end(self.record, action=action, yes=True, registry=self._registry)
            except UserError:
                if action == "stop":
                    raise
