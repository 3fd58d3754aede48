"""Deployments on SkyPilot clusters, through the SkyPilot 0.14 client SDK.

SkyPilot is imported on first use only; every process we start gets
``SKYPILOT_DISABLE_USAGE_COLLECTION=1`` unless the user set that variable.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from typing import Iterator, TextIO

from llm_atc.backends._base import LiveState
from llm_atc.errors import LaunchError, NotFoundError, UserError
from llm_atc.options import closest
from llm_atc.registry import Record, Status

USAGE_ENV = "SKYPILOT_DISABLE_USAGE_COLLECTION"


def import_sky():
    """``import sky`` with usage collection off (unless the user chose otherwise)."""
    os.environ.setdefault(USAGE_ENV, "1")
    import sky

    return sky


def infra_names() -> list[str]:
    """Every infra SkyPilot knows: its clouds, kubernetes, slurm, ssh, and aliases."""
    import_sky()
    from sky.utils import registry

    return sorted({*registry.CLOUD_REGISTRY.keys(), *registry.CLOUD_REGISTRY._aliases})


def canonical_infra(name: str) -> str:
    """``name`` spelt as SkyPilot spells it, or a one-line error with close matches."""
    return closest(name, infra_names(), "cloud")


def build_task(config: dict, secrets: dict[str, str]):
    """A ``sky.Task`` parsed and validated by SkyPilot, with secret values attached.

    The config names secrets with null values; the values go in as overrides (a
    null secret left in would be looked up in a secrets store at launch).
    """
    sky = import_sky()
    try:
        return sky.Task.from_yaml_config(
            copy.deepcopy(config),  # SkyPilot consumes the dict
            secrets_overrides=list(secrets.items()) or None,
        )
    except (ValueError, sky.exceptions.InvalidSkyPilotConfigError) as exc:
        raise UserError(f"SkyPilot rejected the task: {_one_line(exc)}") from None


@contextmanager
def sky_errors(cluster: str | None = None) -> Iterator[None]:
    """Turn SkyPilot's exceptions into our one-line errors."""
    sky = import_sky()
    try:
        yield
    except sky.exceptions.ClusterDoesNotExist:
        raise NotFoundError(f"cluster {cluster!r} does not exist; see `llm-atc status`") from None
    except sky.exceptions.ClusterNotUpError as exc:
        if "not found" in str(exc).lower():
            raise NotFoundError(f"cluster {cluster!r} does not exist; see `llm-atc status`") from None
        raise LaunchError(_one_line(exc)) from None
    except sky.exceptions.NotSupportedError as exc:
        raise UserError(_one_line(exc)) from None
    except sky.exceptions.ApiServerConnectionError as exc:
        raise LaunchError(f"cannot reach the SkyPilot API server: {_one_line(exc)}") from None
    except (sky.exceptions.ResourcesUnavailableError, sky.exceptions.NoCloudAccessError) as exc:
        raise LaunchError(_one_line(exc)) from None
    except ValueError as exc:
        if cluster and "not found" in str(exc).lower():
            raise NotFoundError(f"cluster {cluster!r} does not exist; see `llm-atc status`") from None
        raise UserError(_one_line(exc)) from None


class SkyPilotBackend:
    """Runs tasks on SkyPilot clusters."""

    name = "skypilot"

    def __init__(self, sdk=None):
        self._sdk = sdk

    @property
    def sdk(self):
        if self._sdk is None:
            self._sdk = import_sky()
        return self._sdk

    def launch(self, task, *, cluster: str, stream: bool, no_setup: bool, down: bool = False) -> int | None:
        """Provision (or reuse) ``cluster`` and submit ``task``; returns the job id.

        ``down``: tear the cluster down once its jobs have finished.
        """
        extra = {"down": True} if down else {}
        with sky_errors(cluster):
            request = self.sdk.launch(task, cluster_name=cluster, no_setup=no_setup, **extra)
            result = self.sdk.stream_and_get(request) if stream else self.sdk.get(request)
        return result[0] if result else None

    def launch_managed(self, task, *, name: str, stream: bool) -> int | None:
        """Submit ``task`` as a SkyPilot managed job (spot recovery); returns its job id."""
        with sky_errors():
            request = self.sdk.jobs.launch(task, name=name)
            result = self.sdk.stream_and_get(request) if stream else self.sdk.get(request)
        job_ids = result[0] if result else None
        return job_ids[0] if isinstance(job_ids, list) and job_ids else job_ids

    def job_failed(self, record: Record) -> str | None:
        """A reason when the serving job has ended (it should run forever), else None."""
        job_id = record.details.get("job_id")
        if job_id is None:
            return None
        try:
            with sky_errors(record.cluster):
                statuses = self.sdk.get(self.sdk.job_status(record.cluster, [job_id]))
        except (UserError, LaunchError):
            return None
        status = (statuses or {}).get(job_id)
        if status is not None and status.is_terminal():
            return f"the engine's job on {record.cluster} ended ({status.value})"
        return None

    def endpoint(self, record: Record) -> str:
        port = record.port or 8000
        with sky_errors(record.cluster):
            urls = self.sdk.get(self.sdk.endpoints(record.cluster, port))
        url = (urls or {}).get(port) or (urls or {}).get(str(port))
        if not url:
            raise LaunchError(f"SkyPilot has no endpoint for port {port} on {record.cluster}")
        return url if "://" in url else f"http://{url}"

    def states(self, records: list[Record]) -> dict[int, LiveState]:
        if not records:
            return {}
        with sky_errors():
            clusters = self.sdk.get(self.sdk.status(cluster_names=sorted({r.cluster for r in records})))
        by_name = {c.name: c for c in clusters}
        states = {}
        for record in records:
            cluster = by_name.get(record.cluster)
            if cluster is None:
                gone = Status.FAILED if record.status == Status.FAILED else Status.DOWN
                states[record.id] = LiveState(gone, "no cluster")
                continue
            sky_status = cluster.status.value
            status = {"UP": record.status, "STOPPED": Status.STOPPED, "INIT": Status.LAUNCHING}[sky_status]
            if sky_status == "UP" and record.status in (Status.DOWN, Status.STOPPED):
                status = Status.RUNNING
            handle = cluster.handle
            resources = getattr(handle, "launched_resources", None)
            states[record.id] = LiveState(
                status,
                sky_status,
                cloud=str(resources.cloud) if resources is not None and resources.cloud else None,
                region=getattr(resources, "region", None),
                resources=cluster.resources_str,
            )
        return states

    def logs(self, record: Record, *, follow: bool, output: TextIO | None = None) -> int:
        with sky_errors(record.cluster):
            return self.sdk.tail_logs(record.cluster, record.details.get("job_id"), follow, output_stream=output)

    def stop(self, record: Record) -> None:
        with sky_errors(record.cluster):
            self.sdk.get(self.sdk.stop(record.cluster))

    def down(self, record: Record) -> None:
        with sky_errors(record.cluster):
            self.sdk.get(self.sdk.down(record.cluster))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(exc).__name__
