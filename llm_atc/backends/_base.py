"""The protocol every backend implements: SkyPilot clusters, or processes on this machine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TextIO

from llm_atc.registry import Record


@dataclass(frozen=True)
class LiveState:
    """What the backend sees of a deployment right now.

    ``status`` is one of the registry's statuses; ``detail`` is the backend's own
    word for it (SkyPilot's cluster status, or the process state).
    """

    status: str
    detail: str = ""
    cloud: str | None = None
    region: str | None = None
    resources: str | None = None


class Backend(Protocol):
    """Runs and manages one kind of deployment."""

    name: str

    def endpoint(self, record: Record) -> str:
        """The base URL (``http://HOST:PORT``) of a running deployment."""

    def states(self, records: list[Record]) -> dict[int, LiveState]:
        """The live state of each record, by record id (one round trip where possible)."""

    def logs(self, record: Record, *, follow: bool, output: TextIO | None = None) -> int:
        """Write the engine's logs to ``output`` (default stdout); returns an exit code."""

    def check_stoppable(self, record: Record) -> None:
        """Raise a UserError, before anything changes, when ``stop`` cannot work there."""

    def stop(self, record: Record) -> None:
        """Stop the deployment, keeping what it needs to restart (disks, files)."""

    def down(self, record: Record) -> None:
        """Tear the deployment down for good."""
