"""Backends behind one protocol: SkyPilot (clusters, managed jobs, services) and processes on this machine."""

from __future__ import annotations

from llm_atc.backends._base import Backend, LiveState, Workload
from llm_atc.registry import Record

__all__ = ["Backend", "LiveState", "Workload", "backend_for"]


def backend_for(record: Record) -> Backend:
    """The backend that runs ``record``'s workload."""
    if record.is_local:
        from llm_atc.backends.local import LocalBackend

        return LocalBackend()
    from llm_atc.backends.skypilot import SkyPilotBackend

    return SkyPilotBackend()
