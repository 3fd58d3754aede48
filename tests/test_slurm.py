"""End to end on a real Slurm cluster, through real SkyPilot launches: no test doubles.

Needs the single-node cluster of ``scripts/slurm-up.sh`` (``.ci/run`` brings it up and
down). Without it these tests fail, saying so; deselect them with ``-m "not slurm"``.

The scenarios run the vLLM recipe on the CPU node (the node installs vLLM's CPU build into its
own environment, then serves with the API key llm-atc made), except one that keeps the
``transformers`` recipe; all use the tiny model, moto on 127.0.0.1 as the bucket, and tear their
clusters down; the session's SkyPilot API server runs in the test HOME on its own port.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from support.buckets import weight_reads
from support.cli import assert_one_line_error, unique
from support.net import free_port
from support.paths import BIN
from support.training import sharegpt

pytestmark = pytest.mark.slurm

TORCH_CPU_WHEELS = Path("/opt/wheels")
MANAGED_PREFIX = "e2e-managed"
LAUNCH_TIMEOUT = 900  # seconds for one serve to become ready (provisioning + setup + load)


def _real_home() -> Path:
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def _slurm_cluster_name(config: Path) -> str:
    match = re.search(r"(?m)^Host\s+(\S+)", config.read_text())
    assert match, f"no Host entry in {config}"
    return match.group(1)


@pytest.fixture(scope="session")
def slurm(sky_api_server):
    """The local Slurm cluster's name, with ``~/.slurm/config`` visible to SkyPilot in the test HOME.

    At the end, every cluster the session left behind is torn down.
    """
    config = _real_home() / ".slurm" / "config"
    if not config.is_file() or shutil.which("sinfo") is None:
        pytest.fail(
            "no local Slurm cluster: run `sudo bash scripts/slurm-up.sh` first, or deselect with -m 'not slurm'"
        )
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not probe.stdout.strip():
        pytest.fail(f"Slurm does not answer (sinfo: {probe.stderr.strip()}); run `sudo bash scripts/slurm-up.sh`")
    target = Path.home() / ".slurm" / "config"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(config, target)
    yield _slurm_cluster_name(config)
    sky = sky_api_server
    for cluster in sky.get(sky.status()):
        sky.get(sky.down(cluster.name))
    # A managed job's cluster belongs to the jobs controller, which stops with this session's API server:
    # whatever a failed test left of one goes too.
    for job in slurm_jobs_of(MANAGED_PREFIX):
        subprocess.run(["scancel", "--name", job], capture_output=True, timeout=30)


def node_install_envs() -> str:
    """How the node installs torch (for vLLM's CPU build, transformers and training): a CPU build, from
    the local wheel folder where this machine has one (PyTorch's CPU index is the recipes' default)."""
    kv = "VLLM_CPU_KVCACHE_SPACE=1"
    if list(TORCH_CPU_WHEELS.glob("torch-2.13.0+cpu-*.whl")):
        return f"TORCH_SPEC=torch==2.13.0+cpu UV_FIND_LINKS={TORCH_CPU_WHEELS} VLLM_CPU_TORCH_INDEX= {kv}"
    return f"TORCH_SPEC=torch==2.13.0+cpu UV_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu {kv}"


@pytest.fixture
def store_envs(s3, moto_endpoint, monkeypatch) -> str:
    """``--envs`` that point the node (and llm-atc's own checks) at moto.

    The test process forgets moto's settings, so llm-atc must take them from ``--envs``.
    """
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    return (
        f"AWS_ENDPOINT_URL={moto_endpoint} AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing "
        "AWS_DEFAULT_REGION=us-east-1"
    )


def slurm_options(slurm: str, cluster: str, port: int, *envs: str, engine: str = "vllm") -> list[str]:
    return [
        "--cloud",
        "slurm",
        "--region",
        slurm,
        "--engine",
        engine,
        "--cpus",
        "1",
        "--port",
        str(port),
        "-c",
        cluster,
        "-y",
        "--timeout",
        str(LAUNCH_TIMEOUT),
        "--envs",
        " ".join([node_install_envs(), *envs]),
    ]


def chat(base_url: str, model: str, *, stream: bool = False, api_key: str = "unused") -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, timeout=120, max_retries=0)
    messages = [{"role": "user", "content": "Say hi"}]
    if stream:
        parts = client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in parts if chunk.choices)
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
    assert reply.choices[0].message.role == "assistant"
    return reply.choices[0].message.content or ""


def slurm_jobs_of(cluster: str) -> list[str]:
    """Names of the Slurm jobs that back ``cluster`` (SkyPilot names them ``<cluster>-<hash>``)."""
    names = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, timeout=30).stdout.split()
    return [name for name in names if name.startswith(cluster + "-")]


def engine_processes(port: int) -> list[int]:
    """Engines (vLLM's server or `transformers serve`) on this machine listening on ``port``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        engine = "vllm.entrypoints.openai.api_server" in cmdline or "transformers serve" in cmdline
        if engine and f"--port {port}" in cmdline:
            found.append(proc.info["pid"])
    return found


def assert_gone(cli, cluster: str, port: int) -> None:
    """``down`` tears it down: no cluster, no Slurm job, no engine process left."""
    result = cli("down", cluster, "-y")
    assert result.exit_code == 0, result
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (slurm_jobs_of(cluster) or engine_processes(port)):
        time.sleep(1)
    assert slurm_jobs_of(cluster) == []
    assert engine_processes(port) == []


def test_serve_bucket_checkpoint_on_slurm(cli, slurm, s3_checkpoint, store_envs, session_dir):
    """llm-atc/<run> from moto → a real SkyPilot launch of the vLLM recipe on Slurm (the node installs
    vLLM's CPU build) → vLLM streams the weights from the bucket (ranged reads, no fetch) → the API key
    llm-atc made is required, chat and stream with it, status, logs, stop refused, a forwarded tunnel, down."""
    cluster, port = unique("e2e-serve"), free_port()
    weights_key = s3_checkpoint.removeprefix("s3://") + "/model.safetensors"
    reads_before = len(weight_reads(session_dir / "moto.log", weights_key))
    result = cli(
        "serve", "--name", "llm-atc/tiny", "--source", s3_checkpoint, *slurm_options(slurm, cluster, port, store_envs)
    )
    assert result.exit_code == 0, result
    assert f"Weights: streamed from {s3_checkpoint}" in result.stderr
    reads = weight_reads(session_dir / "moto.log", weights_key)[reads_before:]
    assert reads and all(" 206 " in line for line in reads), reads[:3]  # the node's ranged reads
    url = f"http://127.0.0.1:{port}/v1"
    assert url in result.stdout
    assert "llm-atc endpoint" in result.stderr and "--forward" in result.stderr  # no ports opened on Slurm
    try:
        shown = cli("endpoint", cluster)
        assert (shown.exit_code, shown.stdout.strip()) == (0, url), shown
        key = cli("endpoint", cluster, "--show_key").stdout.strip()
        assert key.startswith("llm-atc-")
        assert httpx.get(f"{url}/models", timeout=30).status_code == 401
        assert httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200  # SkyServe's probe
        checked = cli("endpoint", cluster, "--check")
        assert checked.exit_code == 0 and "llm-atc/tiny" in checked.stdout, checked
        assert chat(url, "llm-atc/tiny", api_key=key)
        assert chat(url, "llm-atc/tiny", api_key=key, stream=True)

        status = cli("status")
        row = next(line for line in status.stdout.splitlines() if cluster in line)
        assert "RUNNING" in row and f"slurm/{slurm}" in row, status.stdout

        logs = cli("logs", cluster)
        assert logs.exit_code == 0, logs
        assert "Loading safetensors using Runai Model Streamer" in logs.stdout  # vLLM's own line
        assert "files fetched" not in logs.stdout  # nothing was copied to the node first
        assert "vllm-cpu==0.32.0" in logs.stdout or "is ready in" in logs.stdout  # the node's CPU build
        assert "Starting vLLM server on" in logs.stdout and "/v1/chat/completions" in logs.stdout

        stop = cli("stop", cluster, "-y")
        assert_one_line_error(stop, "cannot be stopped", f"llm-atc down {cluster}")
        assert stop.exit_code == 2
        assert cli("endpoint", cluster, "--check").exit_code == 0  # still up, untouched

        forward_and_chat(cluster, "llm-atc/tiny", key)
    finally:
        assert_gone(cli, cluster, port)


def forward_and_chat(cluster: str, model: str, key: str = "unused") -> None:
    """``endpoint --forward``: a local URL through SkyPilot's SSH config, closed by Ctrl-C."""
    local_port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "llm-atc"), "endpoint", cluster, "--forward", "--local_port", str(local_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()  # printed once the engine answers through the tunnel
        assert line.strip() == f"http://127.0.0.1:{local_port}/v1", (line, proc.poll())
        assert chat(line.strip(), model, api_key=key)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "Tunnel closed" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    import socket

    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", local_port)) != 0  # the tunnel is gone


def test_lora_train_then_serve_the_adapter_on_slurm(cli, slurm, s3, tiny_model, store_envs, tmp_path):
    """train --model_type lora (adapter only) on Slurm from a local base folder → the bucket holds the
    adapter and its base → vLLM on Slurm serves the base and the adapter on it → chat under
    llm-atc/<run> → down leaves no job and no engine."""
    bucket = unique("e2e-train")
    s3.create_bucket(Bucket=bucket)
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(sharegpt()))
    run, train_cluster = unique("e2e-run"), unique("e2e-train")
    result = cli(
        "train",
        "--model_type",
        "lora",
        "--finetune_data",
        str(data),
        "--checkpoint_bucket",
        bucket,
        "--checkpoint_store",
        "S3",
        "--name",
        run,
        "--base_model",
        str(tiny_model),
        "--cloud",
        "slurm",
        "--region",
        slurm,
        "--cpus",
        "1",
        "-c",
        train_cluster,
        "-y",
        "--envs",
        f"{node_install_envs()} {store_envs} MERGE=0 MAX_STEPS=2 MAX_SEQ_LEN=64 BATCH_SIZE=2",
    )
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr
    assert "training finished" in result.stdout + result.stderr
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=f"llm-atc/{run}/")["Contents"]}
    assert {
        f"llm-atc/{run}/adapter_config.json",
        f"llm-atc/{run}/adapter_model.safetensors",
        f"llm-atc/{run}/base/config.json",
        f"llm-atc/{run}/base/model.safetensors",
    } <= keys
    listed = cli("list")
    assert run in listed.stdout and "SUCCEEDED" in listed.stdout, listed

    cluster, port = unique("e2e-trained"), free_port()
    served = cli("serve", "--name", f"llm-atc/{run}", *slurm_options(slurm, cluster, port, store_envs))
    try:
        assert served.exit_code == 0, served
        # The run's base streams from <run>/base; the adapter alone is fetched to the node.
        assert f"Weights: streamed from s3://{bucket}/llm-atc/{run}/base into vLLM" in served.stderr
        logs = cli("logs", cluster).stdout
        assert "Loading safetensors using Runai Model Streamer" in logs
        fetched = next(line for line in logs.splitlines() if "files fetched" in line)
        adapter_files = [k for k in keys if not k.startswith(f"llm-atc/{run}/base/")]
        assert f"({len(adapter_files)} files fetched)" in fetched, (fetched, adapter_files)
        key = cli("endpoint", cluster, "--show_key").stdout.strip()
        url = f"http://127.0.0.1:{port}/v1"
        models = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()["data"]
        assert {m["id"] for m in models} == {f"llm-atc/{run}", f"llm-atc/{run}/base"}
        assert chat(url, f"llm-atc/{run}", api_key=key)
        assert chat(url, f"llm-atc/{run}/base", api_key=key)

        # The same adapter added at runtime under another name: copied to the node by rsync, loaded
        # by the running vLLM (no restart), then unloaded.
        hot = cli("adapters", "add", cluster, f"hot=llm-atc/{run}", "--envs", store_envs)
        assert hot.exit_code == 0, hot
        assert chat(url, "hot", api_key=key)
        assert cli("adapters", "remove", cluster, "hot").exit_code == 0
        models = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()["data"]
        assert "hot" not in {m["id"] for m in models}
    finally:
        assert_gone(cli, cluster, port)
        assert slurm_jobs_of(train_cluster) == []  # the training cluster took itself down


def test_local_folder_ctrl_c_then_python_api(slurm, tiny_model):
    """A folder synced by rsync; Ctrl-C while waiting leaves the cluster up with the commands to
    check on it; the Python API then waits for it, tunnels to it and tears it down."""
    import llm_atc

    cluster, port = unique("e2e-folder"), free_port()
    args = [
        str(BIN / "llm-atc"),
        "serve",
        "--name",
        str(tiny_model),
        *slurm_options(slurm, cluster, port, engine="transformers"),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stderr = []
    try:
        for line in proc.stderr:
            stderr.append(line)
            if line.startswith("Waiting for"):
                break
        assert any(line.startswith("Waiting for") for line in stderr), "".join(stderr)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        stderr.append(proc.stderr.read())
        told = "".join(stderr)
        assert f"The cluster {cluster} is left up" in told
        for command in ("llm-atc status", f"llm-atc endpoint {cluster} --check", f"llm-atc down {cluster}"):
            assert command in told

        deployment = llm_atc.get(cluster)
        deployment.wait_ready(timeout=LAUNCH_TIMEOUT)
        assert deployment.endpoint == f"http://127.0.0.1:{port}"
        assert deployment.name == tiny_model.name  # a folder given by its absolute path: served as its name
        assert chat(deployment.base_url, tiny_model.name)
        with deployment.forward() as base_url:
            assert base_url != deployment.base_url
            assert chat(base_url, tiny_model.name)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        llm_atc.get(cluster).down()
    assert slurm_jobs_of(cluster) == [] and engine_processes(port) == []


def free_port_run(count: int) -> int:
    """A port such that it and the ``count - 1`` after it are free (an endpoint and its engines, router)."""
    import socket

    for _ in range(50):
        first = free_port()
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return first
    raise RuntimeError(f"no run of {count} free ports")


def test_chat_and_embeddings_behind_one_endpoint_on_slurm(cli, slurm, tiny_model, tmp_path, tls_files):
    """A chat model and an embedding model, one vLLM each on the Slurm node, vLLM's router, and llm-atc's gateway
    on the endpoint port serving HTTPS: each answers what it serves with the key llm-atc made, an unknown name
    gets a 404, and down leaves no engine behind."""
    from openai import OpenAI

    from llm_atc.demo import build_tiny_encoder

    other = build_tiny_encoder(tmp_path / "tiny-embed")
    cluster, port = unique("e2e-two"), free_port_run(5)
    tls = ["--tls_cert", str(tls_files["cert"]), "--tls_key", str(tls_files["key"])]
    result = cli("serve", "--name", str(tiny_model), "--name", str(other), *tls, *slurm_options(slurm, cluster, port))
    assert result.exit_code == 0, result
    url = f"https://127.0.0.1:{port}/v1"
    assert url in result.stdout and f"{other.name} (embeddings)" in result.stdout
    names = [tiny_model.name, other.name]  # folders by absolute path: served under their names on a node
    try:
        key = cli("endpoint", cluster, "--show_key").stdout.strip()
        web = httpx.Client(verify=str(tls_files["cert"]), timeout=30)
        headers = {"Authorization": f"Bearer {key}"}
        assert web.get(f"{url}/models").status_code == 401
        listed = web.get(f"{url}/models", headers=headers).json()["data"]
        assert sorted(m["id"] for m in listed) == sorted(names)
        client = OpenAI(base_url=url, api_key=key, http_client=web, max_retries=0)
        reply = client.chat.completions.create(
            model=names[0], messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.model == names[0] and reply.choices[0].message.role == "assistant"
        vectors = client.embeddings.create(model=names[1], input=["alpha beta", "gamma"])
        assert [len(v.embedding) for v in vectors.data] == [128, 128]
        assert web.post(f"{url}/embeddings", json={"model": names[1], "input": ["x"]}).status_code == 401
        stream = client.completions.create(model=names[0], prompt="Hello", max_tokens=4, stream=True)
        assert sum(1 for _ in stream) >= 2
        unknown = web.post(f"{url}/chat/completions", headers=headers, json={"model": "nope", "messages": []})
        assert unknown.status_code == 404 and "This endpoint serves" in unknown.text
        logs = cli("logs", cluster).stdout
        assert "through vLLM's router" in logs and f"[{names[1]}] " in logs and "[router] " in logs
        assert "vllm-router==0.1.17" in logs or "is ready in" in logs  # the node installed the router
        assert "--runner pooling" in logs
    finally:
        assert_gone(cli, cluster, port)
    for engine_port in range(port + 1, port + 3):
        assert engine_processes(engine_port) == []


def test_engine_that_dies_on_the_node(cli, slurm, tmp_path):
    """A folder vLLM cannot load: one line saying the engine's job ended, its log tail, FAILED in the
    registry, non-zero exit, and the cluster torn down."""
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    cluster, port = unique("e2e-dead"), free_port()
    result = cli("serve", "--name", str(broken), *slurm_options(slurm, cluster, port))
    assert_one_line_error(result, f"the engine's job on {cluster} ended")
    assert result.exit_code == 1
    assert "The end of its log" in result.stderr, result.stderr
    assert "no-such-architecture" in result.stderr, result.stderr  # the engine's own words
    assert f"Tore down {cluster}" in result.stderr
    from llm_atc.registry import Registry

    assert Registry().find(cluster).status == "FAILED"
    assert slurm_jobs_of(cluster) == [] and engine_processes(port) == []


def test_a_managed_job_through_the_real_jobs_controller(cli, slurm):
    """A managed job (what `train --use_spot` launches) on Slurm, through SkyPilot's real jobs controller
    (consolidation mode, inside the API server): its record follows the controller's state, `logs` are
    the managed job's, `stop` cancels it. (Slurm has no spot instances, so the workload is launched through
    the backend directly; offline, the controller never sees a job finish: it waits for the internet.)"""
    from llm_atc.app.lifecycle import end, reconcile
    from llm_atc.backends import Workload
    from llm_atc.backends.skypilot import SkyPilotBackend
    from llm_atc.registry import Record, Registry

    registry = Registry()
    booted = boot_time()
    name = unique(MANAGED_PREFIX)
    record = registry.add(
        Record(
            name=name,
            kind="train",
            model="m",
            cluster=name,
            status="LAUNCHING",
            cloud="slurm",
            region=slurm,
            details={"managed": True},
        )
    )
    config = {
        "name": name,
        "resources": {"infra": f"slurm/{slurm}", "cpus": 1},
        "run": "echo llm-atc managed job started; sleep 900",
    }
    backend = SkyPilotBackend()
    changes = backend.launch(Workload(record, config))
    registry.update(record, details={**record.details, **changes["details"]})
    assert isinstance(record.details["job_id"], int)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while time.monotonic() < deadline and reconcile([record], registry)[record.id].status != "RUNNING":
        time.sleep(5)
    assert record.status == "RUNNING" and "managed job RUNNING" in reconcile([record], registry)[record.id].detail
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "managed job started" not in cli("logs", name).stdout:
        time.sleep(5)
    assert "llm-atc managed job started" in cli("logs", name).stdout
    end(record, action="stop", yes=True, registry=registry)
    assert record.status == "STOPPED"
    # The controller then takes the job's cluster away: nothing of it may be left on Slurm.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (
        backend._managed_statuses([record]).get(record.details["job_id"]) not in ENDED_JOB or slurm_jobs_of(name)
    ):
        time.sleep(5)
    ended = backend._managed_statuses([record])[record.details["job_id"]]
    # SkyPilot tells its controller process by an exact start time in seconds, which moves with the kernel's boot
    # time (recomputed from the clock, a whole second at a time): when that moved, it takes its own live
    # controller for dead and says FAILED_CONTROLLER. Only then is that accepted; the job must be gone either way.
    assert ended == "CANCELLED" or (ended == "FAILED_CONTROLLER" and boot_time() != booted), (ended, booted)
    assert slurm_jobs_of(name) == []


ENDED_JOB = ("CANCELLED", "FAILED_CONTROLLER")


def boot_time() -> int:
    """The kernel's boot time (/proc/stat's btime), as it says now."""
    lines = Path("/proc/stat").read_text().splitlines()
    return int(next(line for line in lines if line.startswith("btime")).split()[1])


def _wait_gone(cli, sky, cluster: str, port: int, bound: float) -> tuple[float, dict]:
    """Poll `llm-atc status` (which reconciles) until SkyPilot and Slurm have no trace of ``cluster``; (seconds
    it took, the status row seen last)."""
    start, row = time.monotonic(), {}
    while time.monotonic() - start < bound:
        shown = json.loads(cli("status", cluster, "--json").stdout)["rows"]
        row = shown[0] if shown else row
        ended = row.get("status") in ("DOWN", "FAILED") and not slurm_jobs_of(cluster) and not engine_processes(port)
        if ended and sky.get(sky.status(cluster_names=[cluster])) == []:
            return time.monotonic() - start, row
        time.sleep(5)
    raise AssertionError(f"{cluster} was still there after {bound:.0f}s: {row}")


def test_an_idle_deployment_goes_away_by_itself_on_slurm(cli, slurm, tiny_model, sky_api_server):
    """--idle_minutes 1 on a private vLLM (CPU) deployment (--no_auth: no port opened; it is waited for, and read by
    `top`, through an SSH tunnel): after its last request the engine ends (vLLM's own request counts; the readiness
    and status probes are no traffic), SkyPilot's autodown removes the cluster and its Slurm job without any `down`,
    within idle + 3 minutes, and `status` says why."""
    cluster, port = unique("e2e-idle"), free_port()
    options = [*slurm_options(slurm, cluster, port), "--no_auth"]
    result = cli("serve", "--name", str(tiny_model), *options, "--idle_minutes", "1")
    assert result.exit_code == 0, result
    assert "Private endpoint" in result.stdout
    assert chat(f"http://127.0.0.1:{port}/v1", tiny_model.name)  # this machine is the node: its port is here
    shown = cli("top", cluster, "--once", "--json", "--interval", "2")  # through the tunnel
    assert shown.exit_code == 0, shown
    (row,) = json.loads(shown.stdout)["rows"]
    assert row["window"] is not None and row["window"]["in_flight"] == 0, row
    _, row = _wait_gone(cli, sky_api_server, cluster, port, 60 + 180)
    assert row["status"] == "DOWN" and "idle 1 min" in row["detail"], row


def test_a_time_limit_ends_a_deployment_on_slurm(cli, slurm, tiny_model, sky_api_server):
    """--max_hours 0.02 (72 s) ends a transformers deployment whatever it does; the cluster goes the same way."""
    cluster, port = unique("e2e-hours"), free_port()
    options = slurm_options(slurm, cluster, port, engine="transformers")
    result = cli("serve", "--name", str(tiny_model), *options, "--max_hours", "0.02", "--open_port")
    assert result.exit_code == 0, result
    _, row = _wait_gone(cli, sky_api_server, cluster, port, 72 + 180)
    assert row["status"] == "DOWN" and "0.02 hours up" in row["detail"], row
