"""The one boundary that cannot run here, a public cloud provisioning a GPU VM: recording stand-ins for
SkyPilot's client SDK, its managed jobs and SkyServe."""

from __future__ import annotations

import sys
import types


class FakeCluster:
    """A cluster as ``sky.status`` describes it."""

    def __init__(self, name: str, status: str):
        from sky.utils import status_lib

        self.name, self.status = name, status_lib.ClusterStatus[status]
        self.handle = types.SimpleNamespace(head_ip="10.0.0.1", launched_resources=None)
        self.resources_str = "1x(gpus=L4:1)"


class FakeSky:
    """Stands in for SkyPilot's client SDK where it would provision cloud VMs; every call is recorded.

    Its calls return their results directly as "request ids"; ``get`` hands them back. The "VM's"
    engine, when a test needs one, is a real server at ``engine_url``.
    """

    def __init__(self, engine_url: str | None = None, job_status: str = "RUNNING", interrupt: bool = False):
        self.engine_url, self.job_state, self.interrupt = engine_url, job_status, interrupt
        self.launches, self.downs, self.stops, self.cancels = [], [], [], []
        self.clusters: dict[str, str] = {}  # cluster name -> SkyPilot status (UP, STOPPED, INIT)
        self.jobs = FakeManagedJobs()

    def launch(self, task, **kwargs):
        self.launches.append((task, kwargs))
        self.clusters[kwargs["cluster_name"]] = "UP"
        return (1, None)

    def stream_and_get(self, request_id):
        return request_id

    get = stream_and_get

    def status(self, cluster_names=None):
        return [
            FakeCluster(name, state)
            for name, state in self.clusters.items()
            if cluster_names is None or name in cluster_names
        ]

    def endpoints(self, cluster, port):
        if self.interrupt:
            raise KeyboardInterrupt
        return {port: self.engine_url}

    def job_status(self, cluster, job_ids):
        from sky.skylet.job_lib import JobStatus

        return {job_ids[0]: JobStatus[self.job_state]}

    def stop(self, cluster):
        self.stops.append(cluster)
        self.clusters[cluster] = "STOPPED"

    def cancel(self, cluster, job_ids=None):
        self.cancels.append((cluster, job_ids))

    def down(self, cluster):
        import sky

        if cluster not in self.clusters:
            raise sky.exceptions.ClusterDoesNotExist(f"Cluster {cluster!r} does not exist.")
        self.downs.append(cluster)
        del self.clusters[cluster]

    def tail_logs(self, cluster, job_id, follow, tail=0, output_stream=None):
        lines = [f"engine line {i}" for i in range(30)] + ["\x1b[31mValueError: not a model\x1b[0m"]
        (output_stream or sys.stdout).write("\n".join(lines[-tail:] if tail else lines) + "\n")
        return 0 if self.job_state == "SUCCEEDED" else 1


class FakeManagedJobs:
    """``sky.jobs``: a jobs controller that records what it is asked and reports ``statuses``."""

    def __init__(self):
        self.launches, self.cancels = [], []
        self.statuses: dict[int, str] = {}  # job id -> ManagedJobStatus name

    def launch(self, task, name=None):
        self.launches.append((task, name))
        job_id = 10 + len(self.launches)
        self.statuses[job_id] = "PENDING"
        return ([job_id], None)

    def queue_v2(self, refresh, skip_finished=False, job_ids=None):
        from sky.jobs import ManagedJobStatus

        jobs = [
            {"job_id": i, "status": ManagedJobStatus[s]}
            for i, s in self.statuses.items()
            if job_ids is None or i in job_ids
        ]
        return (jobs, len(jobs), {}, len(jobs))

    def cancel(self, name=None, job_ids=None):
        self.cancels.append(job_ids)
        for job_id in job_ids or []:
            self.statuses[job_id] = "CANCELLED"

    def tail_logs(self, name=None, job_id=None, follow=True, tail=None, output_stream=None):
        (output_stream or sys.stdout).write(f"managed job {job_id}: llm-atc: training finished: steps=2\n")
        return 0


class FakeServe:
    """Stands in for ``sky.serve`` (a controller and replicas on a cloud); the replicas' engine is the
    session's real vLLM server."""

    def __init__(self, sky: FakeSky):
        self.sky, self.ups, self.downs = sky, [], []

    def up(self, task, service_name):
        self.ups.append((task, service_name))
        return (service_name, self.sky.engine_url)

    def status(self, names):
        from sky.serve import ReplicaStatus, ServiceStatus

        if not self.ups or names[0] in self.downs:
            return []
        replica = {
            "replica_id": 1,
            "status": ReplicaStatus.READY,
            "handle": self.sky.replica_handle,
            "endpoint": self.sky.engine_url,
        }
        return [
            {
                "name": names[0],
                "status": ServiceStatus.READY,
                "endpoint": self.sky.engine_url,
                "replica_info": [replica],
                "requested_resources_str": "1x[L4:1]",
            }
        ]

    def tail_logs(self, name, target, replica_id, follow, output_stream):
        import sys

        (output_stream or sys.stdout).write(f"{target} {replica_id} of {name}: INFO Started server process\n")

    def down(self, names):
        self.downs.extend(names)


# What the cloud deployments of the tests serve; the session's vLLM answers to each (--alias), so that a
# deployment's first request (readiness) reaches the model it asked for.
FAKE_CLOUD_NAMES = ("tiny-model", "llm-atc/tiny", "Qwen/Qwen2.5-7B")
