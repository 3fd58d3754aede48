"""The real vLLM OpenAI server (its CPU build), started by `llm-atc serve --cloud local`: no stand-ins.

One deployment serves the session (``vllm_deployment`` in conftest: the tiny model with an API key,
a chat template, an extra EOS token, a context length, a LoRA adapter trained by `llm-atc train` and
extra engine flags); every feature is shown by what vLLM itself answers. Starting vLLM on two cores
takes 30-70 s, so the failure cases use models that fail fast.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from support.cli import assert_one_line_error, unique
from support.vllm_setup import EOS_TOKEN, RESPONSE_ROLE, TEMPLATE_MARKER


def get(deployment, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    return httpx.get(deployment.base_url.removesuffix("/v1") + path, headers=headers, timeout=30, **kwargs)


def post(deployment, path: str, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    return httpx.post(deployment.base_url.removesuffix("/v1") + path, json=body, headers=headers, timeout=60)


def engine_processes(deployment) -> list[psutil.Process]:
    from support.cli import using_home

    from llm_atc.registry import Registry

    with using_home(deployment.home):
        record = Registry().find(deployment.cluster)
    leader = psutil.Process(record.pid)
    return [leader, *leader.children(recursive=True)]


def test_chat_stream_and_completions_through_the_openai_client(vllm_deployment):
    client = vllm_deployment.client()
    reply = client.chat.completions.create(
        model=vllm_deployment.model, max_tokens=4, messages=[{"role": "user", "content": "Hello!"}]
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
    chunks = list(
        client.chat.completions.create(
            model=vllm_deployment.model, max_tokens=4, stream=True, messages=[{"role": "user", "content": "Hello!"}]
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    completion = client.completions.create(model=vllm_deployment.model, prompt="Hello", max_tokens=4)
    assert completion.choices[0].text and completion.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):  # vLLM enforces the key llm-atc gave it
        vllm_deployment.client(api_key="wrong").models.list()
    assert httpx.get(vllm_deployment.base_url + "/models", timeout=10).status_code == 401


def test_engine_auto_chose_vllm_and_the_snippet_reads_the_key(vllm_deployment):
    from support.cli import using_home

    from llm_atc.registry import Registry

    with using_home(vllm_deployment.home):
        assert Registry().find(vllm_deployment.cluster).engine == "vllm"
    out = vllm_deployment.result.stdout
    assert f"Endpoint: {vllm_deployment.base_url}" in out and 'os.environ["LLM_ATC_API_KEY"]' in out
    assert vllm_deployment.api_key not in out + vllm_deployment.result.stderr


def test_chat_template_is_the_one_vllm_renders(vllm_deployment):
    rendered = post(
        vllm_deployment,
        "/tokenize",
        {
            "model": vllm_deployment.model,
            "messages": [{"role": "user", "content": "hi"}],
            "add_generation_prompt": True,
            "return_token_strs": True,
        },
    )
    assert rendered.status_code == 200, rendered.text
    text = post(
        vllm_deployment, "/detokenize", {"model": vllm_deployment.model, "tokens": rendered.json()["tokens"]}
    ).json()["prompt"]
    assert text.startswith("<s>" + TEMPLATE_MARKER) and text.endswith("user:\nhi\nassistant:\n")


@pytest.mark.parametrize("token, finish, tokens", [(EOS_TOKEN, "stop", 1), ("Ġfile", "length", 6)])
def test_eos_token_ends_generation_in_vllm(vllm_deployment, tiny_model, token, finish, tokens):
    """A reply forced (logit_bias) to the --eos_token stops after it; forced to another token, it runs to max_tokens."""
    from transformers import AutoTokenizer

    token_id = AutoTokenizer.from_pretrained(tiny_model).convert_tokens_to_ids(token)
    reply = vllm_deployment.client().chat.completions.create(
        model=vllm_deployment.model,
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=6,
        logit_bias={str(token_id): 100},
    )
    assert (reply.choices[0].finish_reason, reply.usage.completion_tokens) == (finish, tokens)


def test_max_model_len_is_enforced_by_vllm(vllm_deployment):
    (listed,) = [m for m in get(vllm_deployment, "/v1/models").json()["data"] if m["id"] == vllm_deployment.model]
    assert listed["max_model_len"] == 128
    with pytest.raises(openai.BadRequestError, match="context length|maximum|too long"):
        vllm_deployment.client().completions.create(model=vllm_deployment.model, prompt="hello " * 200, max_tokens=4)


def test_lora_adapter_from_a_trained_run_answers_under_its_name(vllm_deployment):
    models = {m["id"]: m for m in get(vllm_deployment, "/v1/models").json()["data"]}
    assert models[vllm_deployment.adapter]["parent"] == vllm_deployment.model
    reply = vllm_deployment.client().chat.completions.create(
        model=vllm_deployment.adapter, messages=[{"role": "user", "content": "What is 2 plus 2?"}], max_tokens=4
    )
    assert reply.model == vllm_deployment.adapter and reply.usage.completion_tokens >= 1


def test_vllm_args_reach_vllm_as_data(vllm_deployment):
    """`--response-role '$(touch ...)'` is echoed by vLLM as the role: passed through, never evaluated."""
    body = post(
        vllm_deployment,
        "/v1/chat/completions",
        {"model": vllm_deployment.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    ).json()
    assert body["choices"][0]["message"]["role"] == RESPONSE_ROLE.format(marker=vllm_deployment.marker)
    assert not vllm_deployment.marker.exists()


def test_the_log_shows_the_exact_command_from_the_task(vllm_deployment):
    from support.cli import run_cli, using_home

    from llm_atc.registry import Registry

    with using_home(vllm_deployment.home):
        record = Registry().find(vllm_deployment.cluster)
        logs = run_cli("logs", vllm_deployment.cluster)
    started = [line for line in logs.stdout.splitlines() if line.startswith("llm-atc: starting ")]
    assert len(started) == 1, logs.stdout[-2000:]
    argv = shlex.split(started[0].removeprefix("llm-atc: starting "))
    assert argv[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--port") + 1] == str(record.port) and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--enforce-eager" in argv and "--enable-lora" in argv
    assert "Starting vLLM server on" in logs.stdout  # vLLM's own line


def test_usage_reporting_is_off(vllm_deployment):
    """The engine runs with vLLM's and Hugging Face's reporting switched off, and vLLM wrote no usage file."""
    environments = []
    for proc in engine_processes(vllm_deployment):
        try:
            environments.append(proc.environ())
        except psutil.Error:  # a helper process that has just exited
            continue
    environments = [e for e in environments if e]
    assert len(environments) >= 2  # the API server and the engine core, at least
    assert all(e.get("VLLM_NO_USAGE_STATS") == "1" and e.get("DO_NOT_TRACK") == "1" for e in environments)
    assert all("llm-atc-tests-home" in e["HOME"] for e in environments)
    assert not (Path(environments[0]["HOME"]) / ".config" / "vllm" / "usage_stats.json").exists()


def test_a_model_vllm_cannot_load_fails_in_one_line(cli, vllm_engine, tmp_path):
    """vLLM refuses the folder: one line with vLLM's log tail, FAILED, and no process left."""
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    cluster = unique("vllm-broken")
    result = cli(
        "serve",
        "--name",
        str(folder),
        "--cloud",
        "local",
        "--engine",
        "vllm",
        "--port",
        "0",
        "-c",
        cluster,
        "--timeout",
        "300",
    )
    assert_one_line_error(result, "the engine exited")
    assert "no-such-architecture" in result.stderr, result.stderr  # vLLM's (transformers') own words
    from llm_atc.registry import Registry

    record = Registry().find(cluster)
    assert record.status == "FAILED"
    assert not psutil.pid_exists(record.pid) or psutil.Process(record.pid).status() == psutil.STATUS_ZOMBIE


def test_an_eos_token_the_tokenizer_lacks_fails_before_vllm_loads(cli, vllm_engine, tiny_model):
    cluster = unique("vllm-eos")
    result = cli(
        "serve",
        "--name",
        str(tiny_model),
        "--cloud",
        "local",
        "--engine",
        "vllm",
        "--port",
        "0",
        "-c",
        cluster,
        "--eos_token",
        "<no-such-token>",
        "--timeout",
        "120",
    )
    assert_one_line_error(result, "the engine exited")
    assert "is not a single token" in result.stderr


def test_without_the_engine_one_line_says_how_to_get_it(cli, tiny_model, tmp_path, monkeypatch):
    from llm_atc.app.serve import choose_engine, serve_spec

    monkeypatch.setenv("LLM_ATC_ENGINES", str(tmp_path / "no-engines"))
    result = cli("serve", "--name", str(tiny_model), "--cloud", "local", "--engine", "vllm", "-c", unique("none"))
    assert_one_line_error(result, "llm-atc engines install vllm")
    assert choose_engine(serve_spec(str(tiny_model), cloud="local")) == ("transformers", "")
    listed = cli("engines")
    assert listed.exit_code == 0 and "not installed" in listed.stdout


def test_engines_lists_the_installed_build(cli, vllm_engine):
    listed = cli("engines", "list")
    row = next(line for line in listed.stdout.splitlines() if line.split()[:1] == ["vllm"])
    assert "installed" in row and vllm_engine.build in row and str(vllm_engine.path) in row
    assert_one_line_error(cli("engines", "install", "vlm"), "did you mean vllm")


def test_https_with_the_certificate_given(cli, vllm_engine, tiny_model, tls_files):
    """--tls_cert/--tls_key: vLLM serves HTTPS itself; readiness, `endpoint --check` and the openai client
    (trusting the certificate) go over https, and plain HTTP gets nowhere."""
    from openai import OpenAI
    from support.vllm_setup import VLLM_KEY

    cluster = unique("vllm-tls")
    result = cli(
        "serve",
        "--name",
        str(tiny_model),
        "--cloud",
        "local",
        "--engine",
        "vllm",
        "--port",
        "0",
        "-c",
        cluster,
        "--max_model_len",
        "128",
        "--tls_cert",
        str(tls_files["cert"]),
        "--tls_key",
        str(tls_files["key"]),
        "--secret",
        f"VLLM_API_KEY={VLLM_KEY}",
        "--envs",
        "VLLM_CPU_KVCACHE_SPACE=1",
        "--vllm_args",
        "--enforce-eager",
        "--timeout",
        "600",
    )
    try:
        assert result.exit_code == 0, result
        from llm_atc.registry import Registry

        record = Registry().find(cluster)
        assert record.endpoint.startswith("https://127.0.0.1:")
        assert f"--cacert {tls_files['cert']}" in result.stdout and "SSL_CERT_FILE" in result.stdout
        checked = cli("endpoint", cluster, "--check")
        assert checked.exit_code == 0 and str(tiny_model) in checked.stdout, checked
        client = OpenAI(
            base_url=record.endpoint + "/v1",
            api_key=VLLM_KEY,
            max_retries=0,
            timeout=60,
            http_client=httpx.Client(verify=str(tls_files["cert"])),
        )
        assert client.chat.completions.create(
            model=str(tiny_model), max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
        ).choices
        with pytest.raises(httpx.HTTPError):
            httpx.get(record.endpoint.replace("https://", "http://") + "/v1/models", timeout=10)
    finally:
        cli("stop", cluster)
