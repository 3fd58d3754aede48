"""Several models behind one endpoint (`serve --name A --name B`): one vLLM each, vLLM's router, and llm-atc's
gateway in front.

The rendered tasks are checked by SkyPilot's own parser, GPU layouts against the planner (public configs,
SkyPilot's catalog code on a fixture catalog); the endpoint itself is served for real on this machine by
vLLM's CPU build and vLLM's router, queried with the official openai client.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import time
import urllib.request

import psutil
import pytest
import yaml
from conftest import assert_one_line_error
from test_plan import model_folder

from llm_atc.registry import Registry
from llm_atc.status import current_rows


def dryrun(cli, *args):
    result = cli("serve", *args, "--dryrun")
    assert result.exit_code == 0, result
    return yaml.safe_load(result.stdout), result


def engines_of(config: dict) -> list[list[str]]:
    return [shlex.split(line) for line in config["envs"]["VLLM_COMMAND"].splitlines()]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def sky_task(config: dict):
    from llm_atc.backends.skypilot import import_sky

    return import_sky().Task.from_yaml_config(copy.deepcopy(config))


def test_dryrun_shows_every_engine_the_router_and_the_gateway(cli, catalog, tmp_path):
    """Two 7B models on one A100-80GB: both share it, each with a share of its memory sized from the model."""
    a, b = model_folder(tmp_path, "Llama-2-7b-hf"), model_folder(tmp_path, "Llama-2-13b-hf")
    config, result = dryrun(cli, "--name", str(a), "--name", str(b), "--cloud", "gcp", "--accelerator", "A100-80GB:1")
    task = sky_task(config)  # SkyPilot accepts it
    (resources,) = task.resources
    assert resources.accelerators == {"A100-80GB": 1} and resources.ports == ["8000"]
    first, second = engines_of(config)
    for command, name, port, index in ((first, a.name, "8001", 0), (second, b.name, "8002", 1)):
        assert command[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
        assert flag(command, "--served-model-name") == name
        assert flag(command, "--host") == "127.0.0.1" and flag(command, "--port") == port
        assert flag(command, "--model") == f"$HOME/llm-atc/models/{index}"
        assert config["file_mounts"][f"~/llm-atc/models/{index}"] == str(tmp_path / name)
    # Shares of the GPU's memory in proportion to what each model needs, within vLLM's 0.9 together.
    shares = [float(flag(c, "--gpu-memory-utilization")) for c in (first, second)]
    assert sum(shares) == pytest.approx(0.9, abs=0.002) and shares[1] > shares[0] * 1.5
    router = shlex.split(config["envs"]["ROUTER_COMMAND"])
    assert router[0] == "vllm-router" and "--enable-igw" in router and flag(router, "--host") == "127.0.0.1"
    assert flag(router, "--port") == "8003" and flag(router, "--prometheus-port") == "8004"
    gateway = shlex.split(config["envs"]["GATEWAY_COMMAND"])
    assert gateway[1] == "$HOME/.llm-atc/gateway.py" and "--sequential" in gateway
    assert flag(gateway, "--port") == "$PORT" and flag(gateway, "--router") == "http://127.0.0.1:8003"
    assert config["file_mounts"]["~/.llm-atc/gateway.py"].endswith("recipes/serve/gateway.py")
    assert config["secrets"]["VLLM_API_KEY"] is None  # the gateway checks the key; the engines get it too
    assert "sharing every GPU of 1 x 80 GiB" in result.stderr
    assert config["name"] == "llm-atc-llama-2-7b-hf-llama-2-13b-hf"


def test_models_that_fit_on_a_gpu_each_get_their_own(cli, catalog, tmp_path):
    a, b = model_folder(tmp_path, "Llama-2-7b-hf"), model_folder(tmp_path, "Mistral-7B-v0.1")
    config, result = dryrun(cli, "--name", str(a), "--name", str(b), "--cloud", "gcp", "--accelerator", "L4:2")
    first, second = engines_of(config)
    assert first[:2] == ["env", "CUDA_VISIBLE_DEVICES=0"] and second[:2] == ["env", "CUDA_VISIBLE_DEVICES=1"]
    assert flag(first, "--tensor-parallel-size") == flag(second, "--tensor-parallel-size") == "1"
    assert "--sequential" not in shlex.split(config["envs"]["GATEWAY_COMMAND"])  # own GPUs: started together
    assert "one GPU set each" in result.stderr


def test_models_that_do_not_fit_together_are_refused(cli, catalog, tmp_path, llm_atc_home):
    a, b = model_folder(tmp_path, "Llama-2-70b-hf"), model_folder(tmp_path, "Llama-2-13b-hf")
    result = cli("serve", "--name", str(a), "--name", str(b), "--cloud", "gcp", "--accelerator", "A100-80GB:1", "-y")
    assert_one_line_error(result, "do not fit together on 1 x 80 GiB GPUs", "GiB usable")
    assert not (llm_atc_home / "registry.db").exists() or Registry().records() == []


def test_accelerator_auto_sizes_the_sum(cli, catalog, tmp_path):
    """One 7B model fits an L4; two need two (one each): `auto` offers only what fits both."""
    from llm_atc import colocate
    from llm_atc.planning import auto_accelerators

    a, b = model_folder(tmp_path, "Llama-2-7b-hf"), model_folder(tmp_path, "Mistral-7B-v0.1")
    alone = auto_accelerators(str(a), cloud="gcp").accelerators
    config, result = dryrun(cli, "--name", str(a), "--name", str(b), "--cloud", "gcp", "--accelerator", "auto")
    chosen = [entry["accelerators"] for entry in config["resources"]["any_of"]]
    assert "L4:1" in alone and "L4:1" not in chosen and chosen
    estimates = colocate.estimates_of([str(a), str(b)])
    memory = {"L4": 24, "A100": 40, "A100-80GB": 80, "H100": 80, "T4": 16, "V100": 16, "A10G": 24}
    for entry in chosen:
        name, count = entry.split(":")
        if name in memory:
            colocate.on_gpus(estimates, ["a", "b"], memory[name], int(count))  # raises if they did not fit
    assert len({entry.split(":")[1] for entry in chosen}) == 1  # one count: one layout for every choice
    sky_task(config)
    planned = cli("plan", "--name", str(a), "--name", str(b), "--cloud", "gcp", "--json")
    assert planned.exit_code == 0, planned
    assert json.loads(planned.stdout)["auto"] == chosen  # `plan` says what `auto` picks
    shown = cli("plan", "--name", str(a), "--name", str(b), "--cloud", "gcp")
    assert "Nodes that fit them together" in shown.stdout and f"--accelerator auto: {','.join(chosen)}" in shown.stdout
    assert "one GPU set each" in shown.stdout


@pytest.fixture
def two_models(session_dir):
    from llm_atc.demo import build_tiny_model

    return build_tiny_model(session_dir / "model-a"), build_tiny_model(session_dir / "model-b")


def _group_processes(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def test_two_models_behind_one_endpoint(cli, vllm_engine, two_models, llm_atc_home):
    """The real thing on this machine: two CPU vLLMs, vLLM's router and the gateway, through one port."""
    import openai

    a, b = two_models
    key = "several-models-key"
    result = cli(
        "serve",
        "--name",
        str(a),
        "--name",
        str(b),
        "--cloud",
        "local",
        "--port",
        "0",
        "-c",
        "two",
        "--secret",
        f"VLLM_API_KEY={key}",
        "--envs",
        "VLLM_CPU_KVCACHE_SPACE=1",
        "--max_model_len",
        "256",
        "--timeout",
        "900",
    )
    record = Registry().find("two")
    try:
        assert result.exit_code == 0, result
        assert f"Models behind this endpoint (send one as `model`): {a}, {b}" in result.stdout
        assert "Engines: on the CPUs" in result.stderr
        client = openai.OpenAI(base_url=record.endpoint + "/v1", api_key=key, max_retries=0, timeout=60)
        assert sorted(m.id for m in client.models.list().data) == sorted([str(a), str(b)])
        for name in (str(a), str(b)):
            reply = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
            assert reply.model == name and reply.usage.completion_tokens > 0
        stream = client.completions.create(model=str(b), prompt="Hello", max_tokens=4, stream=True)
        assert sum(1 for _ in stream) >= 2  # server-sent events pass through the gateway and the router
        with pytest.raises(openai.NotFoundError, match=f"This endpoint serves: {a}, {b}"):
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=record.endpoint + "/v1", api_key="wrong", max_retries=0).models.list()
        request = urllib.request.Request(record.endpoint + "/workers", data=b"{}", method="POST")
        request.add_header("Authorization", f"Bearer {key}")
        with pytest.raises(urllib.error.HTTPError) as refused:  # the router's admin API stays private
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 404
        measured = cli(
            "bench", "two", "--model", str(b), "--concurrency", "1,2", "--prompt_tokens", "16",
            "--output_tokens", "8", "--duration", "5", "--max_requests", "8", "--json",
        )  # fmt: skip
        assert measured.exit_code == 0, measured
        report = json.loads(measured.stdout)
        assert report["model"] == str(b) and all(level["successful"] > 0 for level in report["levels"])
        refused = cli("adapters", "add", "two", "x=org/an-adapter")
        assert_one_line_error(refused, "two serves several models")
        (row,) = current_rows(only="two")
        assert row[0] == f"{a}, {b}" and "RUNNING" in row[5]  # status names every model

        # One engine dies: the gateway stops the rest, and the deployment is over.
        engine_port = record.details["models"][1]["engine_port"]
        group = _group_processes(record.pid)
        engine = next(
            p
            for p in group
            if any(c.laddr.port == engine_port and c.status == "LISTEN" for c in p.net_connections(kind="tcp"))
        )
        engine.kill()
        deadline = time.monotonic() + 120
        while _group_processes(record.pid) and time.monotonic() < deadline:
            time.sleep(1)
        assert _group_processes(record.pid) == []
        assert "FAILED" in current_rows(only="two")[0][5]
        log = (llm_atc_home / "local" / "two" / "server.log").read_text()
        assert f"llm-atc: {b} exited with code" in log and "stopping the others" in log
    finally:
        cli("stop", "two")
    assert _group_processes(record.pid) == []
