"""Workloads on SkyPilot (jobs on clusters, managed jobs, SkyServe services), through its 0.14 client SDK.

This is the only module that imports SkyPilot, and only on first use; every process we start
gets ``SKYPILOT_DISABLE_USAGE_COLLECTION=1`` unless the user set that variable.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from llm_atc import ui
from llm_atc.backends._base import LiveState, Workload
from llm_atc.errors import LaunchError, NotFoundError, UserError
from llm_atc.options import shorten
from llm_atc.paths import home, write_private
from llm_atc.registry import Record, Status
from llm_atc.render import NodeFeatures
from llm_atc.sky_sdk import import_sky, one_line, quiet_sky, uncoloured


@functools.cache
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
        return one_line(exc)
    except Exception:
        # What the cloud never supports, whatever the cluster: SkyPilot's static table.
        return getattr(type(cloud_obj), "_CLOUD_UNSUPPORTED_FEATURES", {}).get(wanted)
    return None


def node_features(placement):
    """:class:`~llm_atc.render.NodeFeatures` of the placement's infra, from SkyPilot's feature support."""

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
        raise UserError(f"SkyPilot rejected the task: {one_line(exc)}") from None


@contextmanager
def sky_errors(cluster: str | None = None) -> Iterator[None]:
    """Turn SkyPilot's exceptions into our one-line errors."""
    sky = import_sky()
    try:
        yield
    except sky.exceptions.ClusterDoesNotExist:
        raise NotFoundError(_no_cluster(cluster)) from None
    except sky.exceptions.ClusterNotUpError as exc:
        if "not found" in str(exc).lower():
            raise NotFoundError(_no_cluster(cluster)) from None
        raise LaunchError(one_line(exc)) from None
    except sky.exceptions.NotSupportedError as exc:
        raise UserError(one_line(exc)) from None
    except sky.exceptions.ApiServerConnectionError as exc:
        raise LaunchError(f"cannot reach the SkyPilot API server: {one_line(exc)}") from None
    except (
        sky.exceptions.ResourcesUnavailableError,
        sky.exceptions.NoCloudAccessError,
        sky.exceptions.CloudError,
    ) as exc:
        raise LaunchError(one_line(exc)) from None
    except ValueError as exc:
        if cluster and "not found" in str(exc).lower():
            raise NotFoundError(_no_cluster(cluster)) from None
        raise UserError(one_line(exc)) from None


def cluster_exists(name: str) -> bool:
    """Whether SkyPilot knows a cluster ``name``. Asking needs its API server; one started for this
    question is stopped again, so a typo leaves nothing running."""
    sky = import_sky()
    from sky.server import common

    local = common.is_api_server_local()
    running = local and common.get_api_server_status().status == common.ApiServerStatus.HEALTHY
    try:
        with ui.spinner(f"Asking SkyPilot about cluster {name}"), sky_errors(name), quiet_sky():
            return bool(sky.get(sky.status(cluster_names=[name])))
    finally:
        if local and not running:
            with contextlib.suppress(Exception), quiet_sky():
                sky.api_stop()


def _no_cluster(cluster: str | None) -> str:

    return f"cluster {shorten(cluster or '')} does not exist; see `llm-atc status`"


def ssh_config(cluster: str) -> Path:
    """An ssh_config file for ``ssh -F FILE <cluster>``: the one SkyPilot generates for the
    cluster (as `sky status` does), with ``~`` spelt out so it does not depend on ssh's idea of home."""
    import_sky()
    from sky.client.cli import command  # the function SkyPilot's CLI uses to write ~/.sky/generated/ssh/

    with sky_errors(cluster):
        found = command._get_cluster_records_and_set_ssh_config([cluster])
    if not found:
        raise NotFoundError(_no_cluster(cluster))
    generated = Path.home() / ".sky" / "generated" / "ssh" / cluster
    if not generated.is_file():
        raise LaunchError(f"SkyPilot has no SSH access to {cluster} yet (is it UP? see `llm-atc status`)")
    text = re.sub(r"(?m)(\s)~/", lambda m: f"{m.group(1)}{Path.home()}/", generated.read_text())
    return write_private(home() / "ssh" / f"{cluster}.config", text)


class SkyPilotBackend:
    """Runs workloads through SkyPilot: jobs on clusters, managed jobs, SkyServe services."""

    name = "skypilot"

    def __init__(self, sdk=None):
        self._sdk = sdk

    @property
    def sdk(self):
        if self._sdk is None:
            self._sdk = import_sky()
        return self._sdk

    # --- launching ---------------------------------------------------------------------------------

    def validate(self, workload: Workload) -> None:
        build_task(workload.config, workload.secrets)

    def launch(self, workload: Workload) -> dict:
        """``sky.launch`` (a job on a cluster), ``sky.jobs.launch`` (a managed job) or ``sky.serve.up``."""
        task = build_task(workload.config, workload.secrets)
        record = workload.record
        with sky_errors(record.cluster):
            if record.mode == "service":
                result = self.sdk.stream_and_get(self.sdk.serve.up(task, service_name=record.cluster))
                if not result or not result[1]:
                    raise LaunchError(f"SkyServe gave service {record.cluster} no endpoint")
                return {"endpoint": _http(result[1], record)}
            if record.mode == "managed":
                request = self.sdk.jobs.launch(task, name=record.name)
            else:
                extra = {"down": True} if workload.down_when_done else {}
                request = self.sdk.launch(task, cluster_name=record.cluster, no_setup=workload.no_setup, **extra)
            result = self.sdk.stream_and_get(request) if workload.stream else self.sdk.get(request)
        job_id = result[0] if result else None
        if isinstance(job_id, list):  # managed jobs: one id per job
            job_id = job_id[0] if job_id else None
        return {"details": {"job_id": job_id}}

    def update_service(self, record: Record, config: dict, secrets: dict[str, str], *, blue_green: bool) -> None:
        """``sky.serve.update``: SkyServe starts replicas of the new version and retires the old ones as those
        become ready (rolling), or switches traffic once all new ones are ready (blue-green)."""
        from sky.serve.serve_utils import UpdateMode

        if record.mode != "service":
            raise UserError(f"{record.cluster} is a cluster deployment, not a SkyServe service")
        task = build_task(config, secrets)
        mode = UpdateMode.BLUE_GREEN if blue_green else UpdateMode.ROLLING
        with sky_errors(record.cluster):
            self.sdk.stream_and_get(self.sdk.serve.update(task, record.cluster, mode=mode))

    # --- what became of it ---------------------------------------------------------------------------

    def service(self, name: str) -> dict | None:
        """SkyServe's record of service ``name`` (status, endpoint, replica_info, ...), or None."""
        with sky_errors(name):
            found = self.sdk.get(self.sdk.serve.status([name]))
        return found[0] if found else None

    def _replica_info(self, record: Record) -> list[dict]:
        """SkyServe's replicas of the service, by replica id."""
        found = self.service(record.cluster) or {}
        return sorted(found.get("replica_info") or [], key=lambda r: r["replica_id"])

    def ready_replicas(self, record: Record) -> list[tuple[int, str]]:
        """A service's READY replicas: (id, base URL of its engine) each."""
        ready = []
        for replica in self._replica_info(record):
            endpoint = replica.get("endpoint")
            if _status_name(replica["status"]) == "READY" and endpoint:
                ready.append((replica["replica_id"], endpoint if "://" in endpoint else f"http://{endpoint}"))
        return ready

    def replicas(self, record: Record) -> list[tuple[str, str, str, str, str]]:
        """A service's replicas: (id, status, infra, resources, $/hour) each."""
        rows = []
        for replica in self._replica_info(record):
            resources = getattr(replica.get("handle"), "launched_resources", None)
            infra = (
                "/".join(str(p) for p in (getattr(resources, "cloud", None), getattr(resources, "region", None)) if p)
                or "-"
            )
            try:
                price = f"{resources.get_cost(3600):.2f}" if resources is not None else "-"
            except Exception:
                price = "-"
            rows.append(
                (
                    str(replica["replica_id"]),
                    _status_name(replica["status"]),
                    infra,
                    str(resources) if resources is not None else "-",
                    price,
                )
            )
        return rows

    def _job_status(self, record: Record) -> str | None:
        """SkyPilot's status of the record's job (RUNNING, SUCCEEDED, FAILED_SETUP, ...); None when unknown."""
        job_id = record.details.get("job_id")
        if job_id is None:
            return None
        try:
            if record.mode == "managed":
                return self._managed_statuses([record]).get(job_id)
            with sky_errors(record.cluster):
                statuses = self.sdk.get(self.sdk.job_status(record.cluster, [job_id]))
        except (UserError, LaunchError):
            return None
        status = (statuses or {}).get(job_id)
        return _status_name(status) if status is not None else None

    def _managed_statuses(self, records: list[Record]) -> dict[int, str]:
        """Managed job id -> ManagedJobStatus name, from the jobs controller."""
        ids = sorted({r.details["job_id"] for r in records if r.details.get("job_id") is not None})
        with sky_errors():
            found = self.sdk.get(self.sdk.jobs.queue_v2(refresh=False, skip_finished=False, job_ids=ids))
        jobs = found[0] if isinstance(found, tuple) else found
        return {job["job_id"]: _status_name(job["status"]) for job in jobs or [] if job.get("job_id") in ids}

    def ended(self, record: Record) -> str | None:
        """Why the workload is over: its job ended (a serving job should run forever) or its service failed."""
        if record.mode == "service":
            try:
                found = self.service(record.cluster)
            except (UserError, LaunchError):
                return None
            status = _status_name(found["status"]) if found else "gone"
            return f"service {record.cluster} is {status}" if "FAILED" in status or status == "gone" else None
        job = self._job_status(record)
        if job is None or job not in TERMINAL_JOB_STATUSES:
            return None
        where = "managed job" if record.mode == "managed" else f"job on {record.cluster}"
        what = "engine's" if record.kind == "serve" else "training"
        return f"the {what} {where} ended ({job})"

    def endpoint(self, record: Record) -> str:
        """The engine's URL: SkyPilot's endpoint for the port, or (on infra that opens no
        ports, such as Slurm) the head node's address and the port."""
        port = record.port or 8000
        if record.mode == "service":
            found = self.service(record.cluster)
            if not found or not found.get("endpoint"):
                raise LaunchError(f"service {record.cluster} has no endpoint (see `llm-atc status`)")
            return _http(found["endpoint"], record)
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
                return _http(url, record)
        return _http(f"{self.head_ip(record.cluster)}:{port}", record)

    def head_ip(self, cluster: str) -> str:
        with sky_errors(cluster):
            found = self.sdk.get(self.sdk.status(cluster_names=[cluster]))
        handle = found[0].handle if found else None
        ip = getattr(handle, "head_ip", None)
        if not ip:
            raise LaunchError(f"cluster {cluster} has no head node address yet (is it UP? see `llm-atc status`)")
        return ip

    def states(self, records: list[Record]) -> dict[int, LiveState]:
        by_mode: dict[str, list[Record]] = {}
        for record in records:
            by_mode.setdefault(record.mode, []).append(record)
        states: dict[int, LiveState] = {}
        if by_mode.get("service"):
            states.update(self._service_states(by_mode["service"]))
        if by_mode.get("managed"):
            states.update(self._managed_states(by_mode["managed"]))
        if by_mode.get("cluster"):
            states.update(self._cluster_states(by_mode["cluster"]))
        return states

    def _service_states(self, records: list[Record]) -> dict[int, LiveState]:
        with sky_errors():
            found = {s["name"]: s for s in self.sdk.get(self.sdk.serve.status(sorted({r.cluster for r in records})))}
        states: dict[int, LiveState] = {}
        for record in records:
            service = found.get(record.cluster)
            if service is None:
                states[record.key] = _gone(record, "no service")
                continue
            status = _status_name(service["status"])
            replicas = service.get("replica_info") or []
            ready = sum(1 for r in replicas if _status_name(r["status"]) == "READY")
            ours = (
                Status.FAILED
                if "FAILED" in status
                else Status.RUNNING
                if status in ("READY", "NO_REPLICA")
                else Status.LAUNCHING
            )
            states[record.key] = LiveState(
                ours,
                f"{status}, {ready}/{len(replicas)} replicas ready",
                resources=service.get("requested_resources_str"),
            )
        return states

    def _managed_states(self, records: list[Record]) -> dict[int, LiveState]:
        statuses = self._managed_statuses(records)
        states: dict[int, LiveState] = {}
        for record in records:
            status = statuses.get(record.details.get("job_id", -1))
            if status is None:
                states[record.key] = _gone(record, "no managed job")
            else:
                states[record.key] = LiveState(_job_state(status, record), f"managed job {status}")
        return states

    def _cluster_states(self, records: list[Record]) -> dict[int, LiveState]:
        with sky_errors():
            clusters = self.sdk.get(self.sdk.status(cluster_names=sorted({r.cluster for r in records})))
        by_name = {c.name: c for c in clusters}
        states: dict[int, LiveState] = {}
        for record in records:
            cluster = by_name.get(record.cluster)
            if cluster is None:
                states[record.key] = _gone(record, "no cluster")
                continue
            sky_status = _status_name(cluster.status)
            detail = sky_status
            if sky_status == "STOPPED":
                status = Status.STOPPED
            elif sky_status == "INIT":
                status = Status.LAUNCHING if record.is_active else record.status
            else:  # UP: the cluster is there; its job says whether the workload is
                status = Status.RUNNING if record.status in (Status.DOWN, Status.STOPPED) else record.status
                job = self._job_status(record) if record.is_active else None
                if job is not None:
                    status, detail = _job_state(job, record), f"UP, job {job}"
                    if status == Status.FAILED and record.kind == "serve" and record.details.get("limits"):
                        reason = _limit_reason(self.log_tail(record, 400))
                        status, detail = (
                            (Status.DOWN, f"{reason}; SkyPilot tears the cluster down") if reason else (status, detail)
                        )
            resources = getattr(cluster.handle, "launched_resources", None)
            states[record.key] = LiveState(
                status,
                detail,
                cloud=str(resources.cloud) if resources is not None and resources.cloud else None,
                region=getattr(resources, "region", None),
                resources=cluster.resources_str,
            )
        return states

    # --- logs, stop, down ----------------------------------------------------------------------------

    def logs(self, record: Record, *, follow: bool, output: TextIO | None = None) -> int:
        if record.mode == "service":  # the first replica's engine
            replicas = self._replica_info(record)
            if not replicas:
                raise NotFoundError(f"service {record.cluster} has no replica yet; see `llm-atc status`")
            with sky_errors(record.cluster):
                self.sdk.serve.tail_logs(
                    record.cluster,
                    target="replica",
                    replica_id=replicas[0]["replica_id"],
                    follow=follow,
                    output_stream=output,
                )
            return 0
        with sky_errors(record.cluster):
            if record.mode == "managed":
                return (
                    self.sdk.jobs.tail_logs(job_id=record.details.get("job_id"), follow=follow, output_stream=output)
                    or 0
                )
            return self.sdk.tail_logs(record.cluster, record.details.get("job_id"), follow, output_stream=output)

    def log_tail(self, record: Record, lines: int) -> str:
        """The last ``lines`` lines of the job's log (best effort: empty when unavailable)."""
        buffer = io.StringIO()
        try:
            with sky_errors(record.cluster):
                if record.mode == "managed":
                    self.sdk.jobs.tail_logs(
                        job_id=record.details.get("job_id"), follow=False, tail=lines, output_stream=buffer
                    )
                else:
                    self.sdk.tail_logs(
                        record.cluster, record.details.get("job_id"), False, tail=lines, output_stream=buffer
                    )
        except (UserError, LaunchError):
            return ""
        return "\n".join(uncoloured(buffer.getvalue()).rstrip().splitlines()[-lines:])

    def check_stoppable(self, record: Record) -> None:
        """A one-line error, before anything changes, when SkyPilot cannot stop it there."""
        if record.mode == "service":
            raise UserError(
                f"a SkyServe service cannot be stopped; nothing was changed. Scale it to zero with "
                f"--replicas 0..N, or tear it down: llm-atc down {record.cluster}"
            )
        if record.kind == "train":
            return  # stopping a run cancels its job, which works everywhere
        reason = unsupported_feature(record.cloud, record.region, "stop")
        if reason:
            raise UserError(self._cannot_stop(record, reason))

    def stop(self, record: Record) -> None:
        """A deployment's cluster is stopped (its disk kept); a training run's job is cancelled (its
        checkpoints kept, so ``train --resume`` goes on from the last one)."""
        self.check_stoppable(record)
        if record.kind == "train":
            self._cancel(record)
            return
        try:
            with sky_errors(record.cluster):
                self.sdk.get(self.sdk.stop(record.cluster))
        except UserError as exc:  # SkyPilot's NotSupportedError, for a cloud we did not know
            if "not supported" in str(exc).lower():
                raise UserError(self._cannot_stop(record, str(exc))) from None
            raise

    def _cancel(self, record: Record) -> None:
        job_id = record.details.get("job_id")
        with sky_errors(record.cluster):
            if record.mode == "managed":
                self.sdk.get(
                    self.sdk.jobs.cancel(
                        job_ids=[job_id] if job_id is not None else None,
                        name=None if job_id is not None else record.name,
                    )
                )
            elif job_id is not None:
                self.sdk.get(self.sdk.cancel(record.cluster, job_ids=[job_id]))

    @staticmethod
    def _cannot_stop(record: Record, reason: str) -> str:
        where = record.cloud or "this infra"
        return (
            f"clusters on {where} cannot be stopped ({reason.rstrip('.')}); nothing was changed. "
            f"Tear it down instead: llm-atc down {record.cluster}"
        )

    def put_folder(self, record: Record, folder: Path, dest: str) -> str:
        """rsync over the SSH config SkyPilot generates for the cluster (as its own file mounts do)."""
        import shlex
        import shutil
        import subprocess

        for tool in ("ssh", "rsync"):
            if shutil.which(tool) is None:
                raise UserError(f"copying an adapter to {record.cluster} needs {tool}: e.g. apt-get install {tool}")
        config = str(ssh_config(record.cluster))
        ssh = ["ssh", "-F", config, "-o", "BatchMode=yes"]
        made = subprocess.run(
            [*ssh, record.cluster, f"mkdir -p {shlex.quote(dest)} && cd {shlex.quote(dest)} && pwd"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if made.returncode != 0 or not made.stdout.strip():
            raise LaunchError(f"cannot reach {record.cluster} over SSH: {_last_line(made.stderr)}")
        remote = made.stdout.strip().splitlines()[-1]
        copied = subprocess.run(
            ["rsync", "-a", "--delete", "-e", shlex.join(ssh), f"{folder}/", f"{record.cluster}:{remote}/"],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if copied.returncode != 0:
            raise LaunchError(f"cannot copy {folder} to {record.cluster}: {_last_line(copied.stderr)}")
        return remote

    def down(self, record: Record) -> None:
        with sky_errors(record.cluster):
            if record.mode == "service":
                self.sdk.get(self.sdk.serve.down([record.cluster]))
            elif record.mode == "managed":
                self._cancel(record)
            else:
                self.sdk.get(self.sdk.down(record.cluster))


# SkyPilot's job statuses (cluster jobs and managed jobs) after which nothing runs any more.
TERMINAL_JOB_STATUSES = frozenset(
    {
        "SUCCEEDED",
        "FAILED",
        "FAILED_SETUP",
        "FAILED_DRIVER",
        "CANCELLED",
        "FAILED_PRECHECKS",
        "FAILED_NO_RESOURCE",
        "FAILED_CONTROLLER",
        "CANCELLING",
    }
)


def _job_state(job: str, record: Record) -> str:
    """Our status for a record whose job has SkyPilot status ``job`` (a running serving job is a
    deployment as ready as its record says; readiness is the engine's answer, not the job's)."""
    if job not in TERMINAL_JOB_STATUSES:
        if record.kind == "serve":
            return record.status
        return Status.RUNNING if job in ("RUNNING", "RECOVERING") else Status.LAUNCHING
    if job == "SUCCEEDED" and record.kind == "train":
        return Status.SUCCEEDED
    if job in ("CANCELLED", "CANCELLING"):
        return Status.STOPPED
    return Status.FAILED


def _limit_reason(log_text: str) -> str | None:
    from llm_atc.recipes.serve.llm_atc_watch import ended_by_limit

    return ended_by_limit(log_text)


def _gone(record: Record, detail: str) -> LiveState:
    """The state of a record whose cluster, job or service SkyPilot no longer has (a failure stays FAILED)."""
    return LiveState(Status.FAILED if record.status == Status.FAILED else Status.DOWN, detail, gone=True)


def _status_name(status) -> str:
    """``ServiceStatus.READY`` / ``ReplicaStatus.READY`` / ``"READY"`` -> ``"READY"``."""
    return getattr(status, "value", None) or str(status).rsplit(".", 1)[-1]


def _http(url: str, record: Record) -> str:
    """``url`` with its scheme: https when the record's endpoint serves a certificate."""
    scheme = "https" if record.details.get("tls_cert") else "http"
    return url if "://" in url else f"{scheme}://{url}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in uncoloured(text).splitlines() if line.strip()]
    return lines[-1][:400] if lines else "(no output)"
