"""Backends behind one protocol: SkyPilot clusters and processes on this machine."""

from __future__ import annotations

from llm_atc.backends._base import Backend, LiveState
from llm_atc.registry import Record, Registry

__all__ = ["Backend", "LiveState", "backend_for", "lookup"]


def backend_for(record: Record) -> Backend:
    if record.is_local:
        from llm_atc.backends.local import LocalBackend

        return LocalBackend()
    from llm_atc.backends.skypilot import SkyPilotBackend

    return SkyPilotBackend()


def lookup(ref: str, registry: Registry | None = None, *, port: int = 8000) -> Record:
    """The newest record (deployment or training run) named ``ref`` or on cluster ``ref``;
    a SkyPilot cluster we did not launch is looked up as such."""
    from llm_atc.errors import NotFoundError

    registry = registry or Registry()
    try:
        return registry.find(ref)
    except NotFoundError:
        from llm_atc.options import CLUSTER_NAME_RE

        if not CLUSTER_NAME_RE.fullmatch(ref):
            raise
        return Record(name=ref, kind="serve", model="", cluster=ref, status="UNKNOWN", port=port)
