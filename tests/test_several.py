"""Several models behind one endpoint (`serve --name A --name B`): one vLLM each, vLLM's router, and llm-atc's
gateway in front.

The rendered tasks are checked by SkyPilot's own parser, GPU layouts against the planner (public configs,
SkyPilot's catalog code on a fixture catalog); the endpoint itself is served for real on this machine by
vLLM's CPU build and vLLM's router, queried with the official openai client.
"""

from __future__ import annotations

import json
import shlex
import time
import urllib.request

import pytest
from support.cli import assert_one_line_error
from support.dryrun import dryrun, engines_of, flag, sky_task
from support.processes import group_of
from test_plan import model_folder

from llm_atc.registry import Registry
from llm_atc.status import current_rows


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
    from llm_atc.planning import auto_accelerators, colocate

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
def rag_models(session_dir):
    """The RAG trio, tiny: a Qwen2.5-style chat model (tool calls: the table gives it hermes), an embedding
    model and a reranker (BERT, one label)."""
    from support.tiny_models import build_family_model

    from llm_atc.demo import build_tiny_encoder

    chat = session_dir / "Qwen2.5-tiny-Instruct"
    if not chat.exists():
        build_family_model(chat)
    return chat, build_tiny_encoder(session_dir / "embed-b"), build_tiny_encoder(session_dir / "rerank-c", labels=1)


def test_chat_embeddings_and_rerank_behind_one_endpoint(cli, vllm_engine, rag_models, llm_atc_home):
    """The real thing on this machine: a chat model, an embedding model and a reranker, one CPU vLLM each,
    vLLM's router and the gateway, through one port and one key; each answers what it serves."""
    import httpx
    import openai

    a, b, c = rag_models
    key = "several-models-key"
    result = cli(
        "serve", "--name", str(a), "--name", str(b), "--name", str(c), "--cloud", "local", "--port", "0",
        "-c", "rag", "--secret", f"VLLM_API_KEY={key}", "--envs", "VLLM_CPU_KVCACHE_SPACE=1", "--timeout", "900",
    )  # fmt: skip
    record = Registry().find("rag")
    try:
        assert result.exit_code == 0, result
        assert (
            f"Models behind this endpoint (send one as `model`): {a} (chat and completions), {b} (embeddings), "
            f"{c} (rerank and score)"
        ) in result.stdout
        assert f"{a}: chat and completions, tool calls (hermes) (the Qwen2.5 family" in result.stderr
        assert f"{b}: embeddings (BertModel" in result.stderr and f"{c}: rerank and score" in result.stderr
        assert "Engines: on the CPUs" in result.stderr
        base = record.endpoint
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
        assert sorted(m.id for m in client.models.list().data) == sorted([str(a), str(b), str(c)])
        reply = client.chat.completions.create(model=str(a), messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply.model == str(a) and reply.usage.completion_tokens > 0
        stream = client.completions.create(model=str(a), prompt="Hello", max_tokens=4, stream=True)
        assert sum(1 for _ in stream) >= 2  # server-sent events pass through the gateway and the router
        vectors = client.embeddings.create(model=str(b), input=["alpha beta", "gamma", "delta"])
        assert [len(v.embedding) for v in vectors.data] == [128, 128, 128]  # one per input, the hidden size
        headers = {"Authorization": f"Bearer {key}"}
        documents = ["model serve cloud", "water day people", "token train data"]
        ranked = httpx.post(
            f"{base}/v1/rerank", headers=headers, timeout=60,
            json={"model": str(c), "query": "serve a model", "documents": documents},
        )  # fmt: skip
        assert ranked.status_code == 200, ranked.text
        scores = ranked.json()["results"]
        assert sorted(r["index"] for r in scores) == [0, 1, 2]
        assert [r["relevance_score"] for r in scores] == sorted((r["relevance_score"] for r in scores), reverse=True)
        for path, body in (("/invocations", {"model": str(a), "prompt": "Hi"}), ("/classify", {"model": str(c)})):
            assert httpx.post(base + path, json=body, timeout=30).status_code == 401  # the key guards every path
        _tool_calls_and_json_output(client, str(a))
        with pytest.raises(openai.NotFoundError, match=f"This endpoint serves: {a}, {b}, {c}"):
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        request = urllib.request.Request(base + "/workers", data=b"{}", method="POST")
        request.add_header("Authorization", f"Bearer {key}")
        with pytest.raises(urllib.error.HTTPError) as refused:  # the router's admin API stays private
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 404

        _top_shows_each_engine(cli, base, headers, [str(a), str(b), str(c)])
        (row,) = current_rows(only="rag")
        assert row[-1] == "0 running, 0 waiting"  # status's load column, from the same metrics
        checked = cli("endpoint", "rag", "--check")
        assert checked.exit_code == 0, checked
        assert f"  {a}  generates" in checked.stdout and f"  {b}  embeddings of 128 dimensions" in checked.stdout
        assert f"  {c}  reranks" in checked.stdout
        import llm_atc

        deployment = llm_atc.get("rag")
        assert deployment.task == "generate" and len(deployment.embed(["alpha", "beta"], model=str(b))[1]) == 128
        assert sorted(i for i, _ in deployment.rerank("serve", documents)) == [0, 1, 2]
        with pytest.raises(llm_atc.UserError, match="is served for generate, not embed"):
            deployment.embed("alpha", model=str(a))
        measured = cli(
            "bench", "rag", "--model", str(b), "--concurrency", "1,2", "--prompt_tokens", "16",
            "--duration", "5", "--max_requests", "8", "--json",
        )  # fmt: skip
        assert measured.exit_code == 0, measured
        report = json.loads(measured.stdout)
        assert report["model"] == str(b) and report["task"] == "embed"
        for level in report["levels"]:
            assert level["successful"] > 0 and level["requests_per_second"] > 0 and level["input_tokens_per_second"] > 0
            assert 0 < level["latency_p50_ms"] <= level["latency_p95_ms"] < 60_000
        assert_one_line_error(cli("bench", "rag", "--model", str(c)), "bench measures chat and embedding models")
        refused = cli("adapters", "add", "rag", "x=org/an-adapter")
        assert_one_line_error(refused, "rag serves several models")
        (row,) = current_rows(only="rag")
        assert row[0] == f"{a}, {b}, {c}" and row[1] == "serve (generate, embed, rerank)" and "RUNNING" in row[5]

        # One engine dies: the gateway stops the rest, and the deployment is over.
        engine_port = record.details["models"][1]["engine_port"]
        group = group_of(record.pid)
        engine = next(
            p
            for p in group
            if any(conn.laddr.port == engine_port and conn.status == "LISTEN" for conn in p.net_connections(kind="tcp"))
        )
        engine.kill()
        deadline = time.monotonic() + 120
        while group_of(record.pid) and time.monotonic() < deadline:
            time.sleep(1)
        assert group_of(record.pid) == []
        assert "FAILED" in current_rows(only="rag")[0][5]
        log = (llm_atc_home / "local" / "rag" / "server.log").read_text()
        assert f"llm-atc: {b} exited with code" in log and "stopping the others" in log
    finally:
        cli("stop", "rag")
    assert group_of(record.pid) == []


def _top_shows_each_engine(cli, base: str, headers: dict, names: list[str]) -> None:
    """`top` reads each engine's metrics through the gateway (behind the key; the engines' ports stay private): one
    row per model, each with its own figures (embeddings sent to the second model only)."""
    import threading

    import httpx

    stop = threading.Event()

    def embed():
        while not stop.is_set():
            httpx.post(base + "/v1/embeddings", headers=headers, json={"model": names[1], "input": ["a"]}, timeout=30)

    sender = threading.Thread(target=embed)
    sender.start()
    try:
        shown = cli("top", "rag", "--once", "--json", "--interval", "3")
    finally:
        stop.set()
        sender.join(30)
    assert shown.exit_code == 0, shown
    rows = {row["model"]: row["window"] for row in json.loads(shown.stdout)["rows"]}
    assert sorted(rows) == sorted(names)
    assert rows[names[1]]["requests_per_second"] > 0 and rows[names[2]]["requests_per_second"] == 0
    assert httpx.get(base + "/metrics", params={"model": names[1]}, timeout=30).status_code == 401


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _tool_calls_and_json_output(client, model: str) -> None:
    """tools with tool_choice auto, required and named, and a JSON schema, answer in OpenAI's shape. The model is
    random (greedy here, so the run repeats): its arguments are noise, but the function a named or required choice
    calls and the values a schema allows are enforced by vLLM."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER], tool_choice=choice, max_tokens=200, temperature=0
        )
        message = reply.choices[0].message
        assert message.role == "assistant" and reply.choices[0].finish_reason in ("stop", "tool_calls", "length")
        text = "".join((message.content or "").split())
        if isinstance(choice, dict):  # the call itself, parsed by the table's tool parser
            assert message.tool_calls[0].function.name == "get_weather" and message.tool_calls[0].id
        elif choice == "required":  # a call is forced; its random arguments (or blank space) may run past max_tokens
            call_forms = ('<tool_call>{"name":"get_weather"', '[{"name":"get_weather"')
            cut_short = reply.choices[0].finish_reason == "length"
            assert message.tool_calls or (cut_short and any(text[: len(f)] == f[: len(text)] for f in call_forms))
        else:  # auto: the model may call or answer (here often blank space); either way in OpenAI's shape
            assert message.tool_calls or isinstance(message.content, str)
    city = {"type": "string", "enum": ["Paris", "Rome"]}
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": city}},
    )  # fmt: skip
    assert json.loads(reply.choices[0].message.content) in ("Paris", "Rome")
