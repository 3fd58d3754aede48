"""Deployments on SkyPilot clusters, through the SkyPilot 0.14 client SDK.

SkyPilot is imported on first use only; every process we start gets
``SKYPILOT_DISABLE_USAGE_COLLECTION=1`` unless the user set that variable.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import re
from contextlib import contextmanager
from pathlib import Path
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


@functools.lru_cache(maxsize=None)
def unsupported_feature(cloud: str | None, region: str | None, feature: str) -> str | None:
    """SkyPilot's reason why ``cloud`` (``region``) cannot do ``feature``, or None.

    ``feature`` is a ``CloudImplementationFeatures`` value: ``open_ports``,
    ``storage_mounting``, ``stop``, ... Unknown (SkyPilot picks the cloud, or the
    cloud's own check cannot run here) counts as supported.
    """
    if not cloud:
        return None
    sky = import_sky()
    from sky import clouds
    from sky.utils import registry

    cloud_obj = registry.CLOUD_REGISTRY.from_str(cloud)
    if cloud_obj is None:
        return None
    wanted = clouds.CloudImplementationFeatures(feature)
    try:
        resources = sky.Resources(infra="/".join(p for p in (cloud, region) if p))
        cloud_obj.check_features_are_supported(resources, {wanted}, region)
    except sky.exceptions.NotSupportedError as exc:
        return _one_line(exc)
    except Exception:  # noqa: BLE001 - the cloud's own check cannot run here (SDK missing, cluster unreachable)
        # What the cloud never supports, whatever the cluster: SkyPilot's static table.
        return getattr(type(cloud_obj), "_CLOUD_UNSUPPORTED_FEATURES", {}).get(wanted)
    return None


def node_features(placement):
    """:class:`~llm_atc.render.NodeFeatures` of the placement's infra, from SkyPilot's feature support."""
    from llm_atc.render import NodeFeatures

    return NodeFeatures(
        open_ports=unsupported_feature(placement.cloud, placement.region, "open_ports") is None,
        storage_mounting=unsupported_feature(placement.cloud, placement.region, "storage_mounting") is None,
    )


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
    except (sky.exceptions.ResourcesUnavailableError, sky.exceptions.NoCloudAccessError,
            sky.exceptions.CloudError) as exc:
        raise LaunchError(_one_line(exc)) from None
    except ValueError as exc:
        if cluster and "not found" in str(exc).lower():
            raise NotFoundError(f"cluster {cluster!r} does not exist; see `llm-atc status`") from None
        raise UserError(_one_line(exc)) from None


def ssh_config(cluster: str) -> Path:
    """An ssh_config file for ``ssh -F FILE <cluster>``: the one SkyPilot generates for the
    cluster (as `sky status` does), with ``~`` spelt out so it does not depend on ssh's idea of home."""
    import_sky()
    from sky.client.cli import command  # the function SkyPilot's CLI uses to write ~/.sky/generated/ssh/

    from llm_atc.registry import home

    with sky_errors(cluster):
        found = command._get_cluster_records_and_set_ssh_config([cluster])
    if not found:
        raise NotFoundError(f"cluster {cluster!r} does not exist; see `llm-atc status`")
    generated = Path.home() / ".sky" / "generated" / "ssh" / cluster
    if not generated.is_file():
        raise LaunchError(f"SkyPilot has no SSH access to {cluster} yet (is it UP? see `llm-atc status`)")
    text = re.sub(r"(?m)(\s)~/", lambda m: f"{m.group(1)}{Path.home()}/", generated.read_text())
    folder = home() / "ssh"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{cluster}.config"
    path.touch(mode=0o600)
    path.write_text(text)
    return path


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

    def launch_service(self, task, *, name: str) -> str:
        """``sky.serve.up``: a SkyServe service (controller, load balancer, replicas); returns its endpoint."""
        with sky_errors(name):
            result = self.sdk.stream_and_get(self.sdk.serve.up(task, service_name=name))
        endpoint = result[1] if result else None
        if not endpoint:
            raise LaunchError(f"SkyServe gave service {name} no endpoint")
        return _http(endpoint)

    def service(self, name: str) -> dict | None:
        """SkyServe's record of service ``name`` (status, endpoint, replica_info, ...), or None."""
        with sky_errors(name):
            found = self.sdk.get(self.sdk.serve.status([name]))
        return found[0] if found else None

    def _replica_info(self, record: Record) -> list[dict]:
        """SkyServe's replicas of the service, by replica id."""
        found = self.service(record.cluster) or {}
        return sorted(found.get("replica_info") or [], key=lambda r: r["replica_id"])

    def replicas(self, record: Record) -> list[tuple[str, str, str, str, str]]:
        """A service's replicas: (id, status, infra, resources, $/hour) each."""
        rows = []
        for replica in self._replica_info(record):
            resources = getattr(replica.get("handle"), "launched_resources", None)
            infra = "/".join(str(p) for p in (getattr(resources, "cloud", None), getattr(resources, "region", None))
                             if p) or "-"
            try:
                price = f"{resources.get_cost(3600):.2f}" if resources is not None else "-"
            except Exception:  # noqa: BLE001 - a price SkyPilot cannot compute here is just unknown
                price = "-"
            rows.append((str(replica["replica_id"]), _status_name(replica["status"]), infra,
                         str(resources) if resources is not None else "-", price))
        return rows

    def job_end(self, record: Record) -> str | None:
        """The job's final status (SUCCEEDED, FAILED, ...) once it has ended; None while it runs,
        or when SkyPilot cannot say (no job id, cluster gone)."""
        job_id = record.details.get("job_id")
        if job_id is None:
            return None
        try:
            with sky_errors(record.cluster):
                statuses = self.sdk.get(self.sdk.job_status(record.cluster, [job_id]))
        except (UserError, LaunchError):
            return None
        status = (statuses or {}).get(job_id)
        return status.value if status is not None and status.is_terminal() else None

    def job_failed(self, record: Record) -> str | None:
        """A reason when the serving job (or service) has ended or failed (it should run forever), else None."""
        if record.details.get("service"):
            try:
                found = self.service(record.cluster)
            except (UserError, LaunchError):
                return None
            status = _status_name(found["status"]) if found else "gone"
            return f"service {record.cluster} is {status}" if "FAILED" in status or status == "gone" else None
        ended = self.job_end(record)
        return f"the engine's job on {record.cluster} ended ({ended})" if ended else None

    def endpoint(self, record: Record) -> str:
        """The engine's URL: SkyPilot's endpoint for the port, or (on infra that opens no
        ports, such as Slurm) the head node's address and the port."""
        port = record.port or 8000
        if record.details.get("service"):
            found = self.service(record.cluster)
            if not found or not found.get("endpoint"):
                raise LaunchError(f"service {record.cluster} has no endpoint (see `llm-atc status`)")
            return _http(found["endpoint"])
        if record.details.get("open_ports", True):
            try:
                with sky_errors(record.cluster):
                    urls = self.sdk.get(self.sdk.endpoints(record.cluster, port))
            except UserError as exc:  # "Querying endpoints is not supported ... on Slurm."
                if "not supported" not in str(exc):
                    raise
            else:
                url = (urls or {}).get(port) or (urls or {}).get(str(port))
                if not url:
                    raise LaunchError(f"SkyPilot has no endpoint for port {port} on {record.cluster}")
                return _http(url)
        return f"http://{self.head_ip(record.cluster)}:{port}"

    def head_ip(self, cluster: str) -> str:
        with sky_errors(cluster):
            found = self.sdk.get(self.sdk.status(cluster_names=[cluster]))
        handle = found[0].handle if found else None
        ip = getattr(handle, "head_ip", None)
        if not ip:
            raise LaunchError(f"cluster {cluster} has no head node address yet (is it UP? see `llm-atc status`)")
        return ip

    def states(self, records: list[Record]) -> dict[int, LiveState]:
        services = [r for r in records if r.details.get("service")]
        records = [r for r in records if not r.details.get("service")]
        states = self._service_states(services) if services else {}
        if not records:
            return states
        return {**states, **self._cluster_states(records)}

    def _service_states(self, records: list[Record]) -> dict[int, LiveState]:
        with sky_errors():
            found = {s["name"]: s for s in self.sdk.get(self.sdk.serve.status(sorted({r.cluster for r in records})))}
        states = {}
        for record in records:
            service = found.get(record.cluster)
            if service is None:
                states[record.id] = _gone(record, "no service")
                continue
            status = _status_name(service["status"])
            replicas = service.get("replica_info") or []
            ready = sum(1 for r in replicas if _status_name(r["status"]) == "READY")
            ours = (Status.FAILED if "FAILED" in status else Status.RUNNING if status in ("READY", "NO_REPLICA")
                    else Status.LAUNCHING)
            states[record.id] = LiveState(ours, f"{status}, {ready}/{len(replicas)} replicas ready",
                                          resources=service.get("requested_resources_str"))
        return states

    def _cluster_states(self, records: list[Record]) -> dict[int, LiveState]:
        with sky_errors():
            clusters = self.sdk.get(self.sdk.status(cluster_names=sorted({r.cluster for r in records})))
        by_name = {c.name: c for c in clusters}
        states = {}
        for record in records:
            cluster = by_name.get(record.cluster)
            if cluster is None:
                states[record.id] = _gone(record, "no cluster")
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
        if record.details.get("service"):  # the first replica's engine
            replicas = self._replica_info(record)
            if not replicas:
                raise NotFoundError(f"service {record.cluster} has no replica yet; see `llm-atc status`")
            with sky_errors(record.cluster):
                self.sdk.serve.tail_logs(record.cluster, target="replica", replica_id=replicas[0]["replica_id"],
                                         follow=follow, output_stream=output)
            return 0
        with sky_errors(record.cluster):
            return self.sdk.tail_logs(record.cluster, record.details.get("job_id"), follow, output_stream=output)

    def log_tail(self, record: Record, lines: int) -> str:
        """The last ``lines`` lines of the job's log (best effort: empty when unavailable)."""
        buffer = io.StringIO()
        try:
            with sky_errors(record.cluster):
                self.sdk.tail_logs(record.cluster, record.details.get("job_id"), False, tail=lines,
                                   output_stream=buffer)
        except (UserError, LaunchError):
            return ""
        return "\n".join(_uncoloured(buffer.getvalue()).rstrip().splitlines()[-lines:])

    def check_stoppable(self, record: Record) -> None:
        """A one-line error, before anything changes, when SkyPilot cannot stop clusters there."""
        if record.details.get("service"):
            raise UserError(f"a SkyServe service cannot be stopped; nothing was changed. Scale it to zero with "
                            f"--replicas 0..N, or tear it down: llm-atc down {record.cluster}")
        reason = unsupported_feature(record.cloud, record.region, "stop")
        if reason:
            raise UserError(self._cannot_stop(record, reason))

    def stop(self, record: Record) -> None:
        self.check_stoppable(record)
        try:
            with sky_errors(record.cluster):
                self.sdk.get(self.sdk.stop(record.cluster))
        except UserError as exc:  # SkyPilot's NotSupportedError, for a cloud we did not know
            if "not supported" in str(exc).lower():
                raise UserError(self._cannot_stop(record, str(exc))) from None
            raise

    @staticmethod
    def _cannot_stop(record: Record, reason: str) -> str:
        where = record.cloud or "this infra"
        return (f"clusters on {where} cannot be stopped ({reason.rstrip('.')}); nothing was changed. "
                f"Tear it down instead: llm-atc down {record.cluster}")

    def down(self, record: Record) -> None:
        with sky_errors(record.cluster):
            if record.details.get("service"):
                self.sdk.get(self.sdk.serve.down([record.cluster]))
            else:
                self.sdk.get(self.sdk.down(record.cluster))


def _gone(record: Record, detail: str) -> LiveState:
    """The state of a record whose cluster or service SkyPilot no longer has (a failure stays FAILED)."""
    return LiveState(Status.FAILED if record.status == Status.FAILED else Status.DOWN, detail)


def _status_name(status) -> str:
    """``ServiceStatus.READY`` / ``ReplicaStatus.READY`` / ``"READY"`` -> ``"READY"``."""
    return getattr(status, "value", None) or str(status).rsplit(".", 1)[-1]


def _http(url: str) -> str:
    return url if "://" in url else f"http://{url}"


def _uncoloured(text: str) -> str:
    """``text`` without terminal colour codes (SkyPilot colours messages and logs)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in _uncoloured(str(exc)).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(exc).__name__
