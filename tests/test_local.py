"""`--cloud local`: the real CLI and Python API serving the tiny model with `transformers serve`
(tests/test_vllm.py does the same with vLLM).

Everything is real: the engine runs as a process group on 127.0.0.1, the checkpoints
come from moto / the GCS emulator, and requests go through the official ``openai``
client. Every test stops what it starts (``stop_leftovers`` kills any engine group
still recorded in the test's registry, even when an assertion failed).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest
from openai import OpenAI
from support.cli import assert_one_line_error, unique
from support.net import free_port
from support.processes import group_of

URL_RE = re.compile(r"http://127\.0\.0\.1:(\d+)/v1")


# --- helpers -------------------------------------------------------------------------------------


def wait_group_gone(pgid: int, timeout: float = 5.0) -> list[psutil.Process]:
    """Wait (bounded) for the group to empty; returns what is left (empty when gone)."""
    deadline = time.monotonic() + timeout
    left = group_of(pgid)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = group_of(pgid)
    return left


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (connection refused and a listener can take it)."""
    with socket.socket() as probe:
        probe.settimeout(2)
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
        except OSError:
            return False
    return True


def record_for(cluster: str):
    from llm_atc.registry import Registry

    return Registry().find(cluster)


def records_for(cluster: str):
    from llm_atc.registry import Registry

    return [r for r in Registry().records(kind="serve") if r.cluster == cluster]


def status_line(result, cluster: str) -> str:
    """The ``status`` table row of ``cluster`` (exactly one)."""
    assert result.exit_code == 0, result
    lines = [line for line in result.stdout.splitlines() if f" {cluster} " in f" {line} "]
    assert len(lines) == 1, result
    return lines[0]


def client_for(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)


def chat(client: OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=4)
    assert reply.choices, reply
    content = reply.choices[0].message.content
    assert isinstance(content, str) and content, reply
    return content


def serve_cli(cli, name: str, cluster: str, *extra: str):
    return cli(
        "serve", "--name", name, "--cloud", "local", "--engine", "transformers", "--port", "0", "-c", cluster, *extra
    )


def kill_group(pgid: int) -> None:
    if group_of(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        wait_group_gone(pgid, 10)


@pytest.fixture(autouse=True)
def stop_leftovers(llm_atc_home):
    """Whatever a test leaves running (a failed assertion included) is killed at teardown."""
    yield
    if not (llm_atc_home / "registry.db").exists():
        return
    from llm_atc.registry import Registry

    for record in Registry().records(kind="serve"):
        if record.pid:
            kill_group(record.pid)


# --- the happy path through the CLI -------------------------------------------------------------


def test_each_engine_answers_where_readiness_asks(cli, tiny_model, vllm_deployment):
    """The path serve waits on for each engine is one that engine answers once it is up (a wrong one would only
    show as a timeout): transformers serve's /health, vLLM's /v1/models (with the deployment's key)."""
    from llm_atc.readiness import READY_PATHS, probe

    cluster = unique("ready-path")
    served = serve_cli(cli, str(tiny_model), cluster)
    assert served.exit_code == 0, served
    endpoint = record_for(cluster).endpoint
    assert probe(endpoint + READY_PATHS["transformers"])[0] == 200
    vllm = vllm_deployment.base_url.removesuffix("/v1")
    assert probe(vllm + READY_PATHS["vllm"], api_key=vllm_deployment.api_key)[0] == 200
    assert probe(vllm + READY_PATHS["vllm"])[0] == 401  # (and the key is needed there)
    assert cli("stop", cluster).exit_code == 0


def test_cli_serves_a_folder_end_to_end(cli, tiny_model):
    cluster = unique("local")
    model = str(tiny_model)

    result = serve_cli(cli, model, cluster)
    assert result.exit_code == 0, result
    record = record_for(cluster)
    assert record.pid and record.status == "RUNNING" and record.cloud == "local", record
    assert record.engine == "transformers"
    pgid = record.pid
    assert group_of(pgid), "the engine's process group should be alive while RUNNING"

    # stdout: the base URL and a snippet the user can paste
    match = URL_RE.search(result.stdout)
    assert match, result
    port = int(match.group(1))
    assert port != 0 and port == record.port
    base = f"http://127.0.0.1:{port}/v1"
    assert f"Endpoint: {base}" in result.stdout
    assert "from openai import OpenAI" in result.stdout
    assert f'OpenAI(base_url="{base}"' in result.stdout
    assert f"model={json.dumps(model)}" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr

    endpoint = cli("endpoint", cluster)
    assert endpoint.exit_code == 0, endpoint
    assert endpoint.stdout.strip() == base

    # the official client: chat, streamed chat, text completion, under the --name given
    client = client_for(base)
    chat(client, model)
    chunks = list(
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=4, stream=True
        )
    )
    assert chunks
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas, chunks
    completion = client.completions.create(model=model, prompt="Hello", max_tokens=4)
    assert completion.choices and isinstance(completion.choices[0].text, str), completion
    assert completion.usage is None or completion.usage.completion_tokens >= 1

    line = status_line(cli("status"), cluster)
    assert "RUNNING" in line and f"http://127.0.0.1:{port}" in line and "local" in line, line

    logs = cli("logs", cluster)
    assert logs.exit_code == 0, logs
    assert "--- llm-atc: starting at" in logs.stdout
    assert f"127.0.0.1:{port}" in logs.stdout
    assert "/v1/chat/completions" in logs.stdout

    # serving the same cluster again while it runs: one line, and the first keeps serving
    again = serve_cli(cli, model, cluster)
    assert_one_line_error(again, cluster, "already running")
    assert len(records_for(cluster)) == 1
    assert record_for(cluster).status == "RUNNING"
    chat(client, model)

    stopped = cli("stop", cluster)
    assert stopped.exit_code == 0, stopped
    assert "Stopped" in stopped.stderr
    assert wait_group_gone(pgid) == [], "a process of the engine's group survived stop"
    assert port_free(port)
    assert record_for(cluster).status == "STOPPED"

    gone = cli("endpoint", cluster)
    assert_one_line_error(gone, "not running")

    line = status_line(cli("status", "-a"), cluster)
    assert "STOPPED" in line and "RUNNING" not in line, line

    twice = cli("stop", cluster)
    assert twice.exit_code == 0, twice
    assert record_for(cluster).status == "STOPPED"


# --- checkpoints in a bucket --------------------------------------------------------------------


def cache_dir(home: Path, uri: str) -> Path:
    scheme, _, rest = uri.partition("://")
    return home / "cache" / scheme / rest


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative file name -> (size, mtime_ns) for every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("checkpoint", ["s3_checkpoint", "gcs_checkpoint"])
def test_serve_checkpoint_from_bucket_then_reuse_cache(checkpoint, request, cli, tiny_model, llm_atc_home):
    uri = request.getfixturevalue(checkpoint)
    cluster = unique("bucket")
    name = "llm-atc/tiny"

    first = serve_cli(cli, name, cluster, "--source", uri)
    assert first.exit_code == 0, first
    assert "downloaded" in first.stderr, first
    record = record_for(cluster)
    assert record.status == "RUNNING" and record.checkpoint_uri == uri, record
    pgid, port = record.pid, record.port

    cache = cache_dir(llm_atc_home, uri)
    assert (cache / ".complete").is_file()
    expected = {str(p.relative_to(tiny_model)): p.stat().st_size for p in tiny_model.rglob("*") if p.is_file()}
    cached = snapshot(cache)
    assert {k: size for k, (size, _) in cached.items() if k != ".complete"} == expected
    assert not any(k.endswith(".part") for k in cached)

    base = f"http://127.0.0.1:{port}/v1"
    assert base in first.stdout and f"model={json.dumps(name)}" in first.stdout
    chat(client_for(base), name)

    stopped = cli("stop", cluster)
    assert stopped.exit_code == 0, stopped
    assert wait_group_gone(pgid) == []
    assert port_free(port)

    # a second serve of the same source starts from the cache: nothing is downloaded again
    second = serve_cli(cli, name, cluster, "--source", uri)
    assert second.exit_code == 0, second
    assert "downloaded" not in second.stderr, second
    assert snapshot(cache) == cached
    record = record_for(cluster)
    assert record.status == "RUNNING" and record.pid != pgid
    chat(client_for(f"http://127.0.0.1:{record.port}/v1"), name)

    stopped = cli("stop", cluster)
    assert stopped.exit_code == 0, stopped
    assert wait_group_gone(record.pid) == []
    assert record_for(cluster).status == "STOPPED"


# --- failures -----------------------------------------------------------------------------------


def test_folder_that_is_not_a_model_fails_in_one_line(cli, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "nonexistent"}))
    cluster = unique("broken")

    result = serve_cli(cli, str(folder), cluster, "--timeout", "120")
    assert_one_line_error(result, "engine exited")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_at = next(i for i, line in enumerate(lines) if line.startswith("Error: "))
    tail = lines[error_at + 1 :]
    log = Path(record_for(cluster).details["log"])
    assert tail[0] == f"The end of its log ({log}):", result  # what the log says, without its traceback frames
    assert len(tail) > 1 and not any(line.startswith(("  File ", "Traceback")) for line in tail)
    assert all(line in log.read_text() for line in tail[1:]), result
    assert "Endpoint:" not in result.stdout

    (record,) = records_for(cluster)
    assert record.status == "FAILED", record
    assert record.pid
    assert wait_group_gone(record.pid) == []
    assert "FAILED" in status_line(cli("status"), cluster)


def test_busy_port_is_one_line_and_records_nothing_running(cli, tiny_model):
    port = free_port()
    cluster = unique("busy")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        result = cli(
            "serve",
            "--name",
            str(tiny_model),
            "--cloud",
            "local",
            "--engine",
            "transformers",
            "--port",
            str(port),
            "-c",
            cluster,
        )
    assert_one_line_error(result, str(port))
    assert not [r for r in records_for(cluster) if r.status in ("RUNNING", "LAUNCHING")]
    status = cli("status")
    assert status.exit_code == 0, status
    assert "RUNNING" not in status.stdout


def test_engine_killed_from_outside_shows_failed(cli, tiny_model):
    cluster = unique("killed")
    result = serve_cli(cli, str(tiny_model), cluster)
    assert result.exit_code == 0, result
    record = record_for(cluster)
    assert "RUNNING" in status_line(cli("status"), cluster)

    os.killpg(record.pid, signal.SIGKILL)
    assert wait_group_gone(record.pid) == []

    line = status_line(cli("status"), cluster)
    assert "FAILED" in line and "RUNNING" not in line, line
    assert record_for(cluster).status == "FAILED"
    assert_one_line_error(cli("endpoint", cluster), "not running")

    stopped = cli("stop", cluster)
    assert stopped.exit_code == 0, stopped
    assert record_for(cluster).status == "FAILED"  # a stop keeps the failure visible


def test_stop_of_an_invalid_unknown_name_is_one_line(cli):
    result = cli("stop", "No_Such/Thing")
    assert_one_line_error(result, "No_Such/Thing")


# --- the Python API -----------------------------------------------------------------------------


def test_python_api_context_manager(tiny_model):
    from llm_atc import serve

    cluster = unique("api")
    with serve(str(tiny_model), cloud="local", engine="transformers", port=0, cluster=cluster) as dep:
        pgid, port = dep.record.pid, dep.record.port
        assert dep.base_url == f"http://127.0.0.1:{port}/v1"
        assert dep.name == str(tiny_model) and dep.cluster == cluster
        chat(client_for(dep.base_url), dep.name)
        assert dep.status() == "RUNNING"
        logs = dep.logs()
        assert "--- llm-atc: starting at" in logs and "/v1/chat/completions" in logs
        assert group_of(pgid)
    assert dep.status() == "STOPPED"
    assert wait_group_gone(pgid) == []
    assert port_free(port)
    assert record_for(cluster).status == "STOPPED"
