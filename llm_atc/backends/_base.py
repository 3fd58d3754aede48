"""The protocol every backend implements (SkyPilot, or processes on this machine), and what it launches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from llm_atc.registry import Record


@dataclass(frozen=True)
class LiveState:
    """What the backend sees of a record right now.

    ``status`` is one of the registry's statuses; ``detail`` is the backend's own
    word for it (SkyPilot's cluster or job status, or the process state). ``gone``: nothing
    of it is left where it ran (what a training run left in its bucket may still tell).
    """

    status: str
    detail: str = ""
    gone: bool = False
    cloud: str | None = None
    region: str | None = None
    resources: str | None = None


@dataclass
class Workload:
    """One rendered serve or training run, ready for a backend to launch.

    ``record`` is what the registry keeps of it (its ``mode`` says how it runs: a job on a
    cluster, a managed job, a SkyServe service or a process here). ``config`` is the SkyPilot
    task config, with secrets named only; their values are ``secrets``.
    """

    record: Record
    config: dict
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    stream: bool = True  # stream SkyPilot's provisioning and setup logs
    no_setup: bool = False
    down_when_done: bool = False  # the cluster goes away once its job has ended (SkyPilot's autodown)
    workdir: Path | None = None  # a process here runs in this folder, logging to log

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def log(self) -> Path | None:
        return Path(self.record.details["log"]) if self.record.details.get("log") else None


class Backend(Protocol):
    """Launches workloads and manages what they became."""

    name: str

    def validate(self, workload: Workload) -> None:
        """Raise a UserError when the backend would refuse the workload (before anything is recorded)."""

    def launch(self, workload: Workload) -> dict:
        """Start the workload; returns what to add to its record's details (job id, pid, ...)."""

    def ended(self, record: Record) -> str | None:
        """Why the workload is over (its job or process ended, its service failed), or None while it runs."""

    def endpoint(self, record: Record) -> str:
        """The base URL (``http://HOST:PORT``) of a running deployment."""

    def states(self, records: list[Record]) -> dict[int, LiveState]:
        """The live state of each record, by record id (one round trip where possible)."""

    def logs(self, record: Record, *, follow: bool, output: TextIO | None = None) -> int:
        """Write the workload's logs to ``output`` (default stdout); returns an exit code."""

    def log_tail(self, record: Record, lines: int) -> str:
        """The last ``lines`` lines of its log (best effort: empty when unavailable)."""

    def check_stoppable(self, record: Record) -> None:
        """Raise a UserError, before anything changes, when ``stop`` cannot work there."""

    def stop(self, record: Record) -> None:
        """Stop it, keeping what it needs to go on (disks, checkpoints)."""

    def down(self, record: Record) -> None:
        """End it for good; raises NotFoundError when there is nothing left to end."""

    def replicas(self, record: Record) -> list[tuple[str, str, str, str, str]]:
        """A service's replicas: (id, status, infra, resources, $/hour) each; none for other deployments."""

    def ready_replicas(self, record: Record) -> list[tuple[int, str]]:
        """A service's READY replicas: (id, base URL of its engine) each; none for other deployments."""

    def update_service(self, record: Record, config: dict, secrets: dict[str, str], *, blue_green: bool) -> None:
        """Replace a service's replicas with ones running task ``config`` (rolling, or all at once when the new
        ones are ready: ``blue_green``); a UserError for deployments that are not services."""

    def put_folder(self, record: Record, folder: Path, dest: str) -> str:
        """Make ``folder`` readable by its engine under ``dest`` (relative to the node's home); the
        absolute path the engine reads it from."""
