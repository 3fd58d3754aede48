"""What the Python API's handles (Deployment, TrainingRun) share: a registry record."""

from __future__ import annotations

from llm_atc.registry import Record, Registry


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
