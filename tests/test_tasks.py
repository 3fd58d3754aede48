"""What a deployment serves, read from the model (#22): chat, embeddings, rerank or classification, and vLLM's
tool-call and reasoning parsers for the model's family.

Dry runs of real models' config.json files are checked by SkyPilot's own parser and every engine flag against
the pinned vLLM's; the parser table against the parsers the installed vLLM registers; and the paths that only a
live engine shows (embeddings from a decoder, a reasoning parser starting, the API key on vLLM's unguarded
routes) against the real vLLM server (CPU build). The chat + embeddings + rerank endpoint is in test_several.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from support.cli import assert_one_line_error, unique
from support.dryrun import command_of, dryrun, sky_task
from support.paths import ROOT
from support.tiny_models import THINK_TOKENS, TOOL_TOKENS, build_family_model
from test_plan import CONFIGS, model_folder

from llm_atc.registry import Registry

GPU = ("--cloud", "gcp", "--accelerator", "L4:1")


def flags_of(command: list[str]) -> set[str]:
    return {token for token in command if token.startswith("--")}


def check_against_vllm(command: list[str]) -> None:
    """Every flag of the rendered command is one the pinned vLLM's parser has."""
    from llm_atc.vllm_flags import pinned_flags

    known = pinned_flags()[1]
    unknown = [token for token in flags_of(command) if token not in known]
    assert not unknown, unknown


def family_folder(tmp_path: Path, name: str) -> Path:
    folder = model_folder(tmp_path, name, index=False)
    extra = CONFIGS / f"{name}.modules.json"
    if extra.is_file():
        shutil.copy(extra, folder / "modules.json")
    return folder


# (fixture config, the line serve prints, flags the engine gets, flags it must not get)
FAMILIES = [
    ("Qwen2.5-0.5B-Instruct", "tool calls (hermes) (the Qwen2.5 family",
     ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--enable-lora"], ["--reasoning-parser"]),
    ("Qwen3-8B", "tool calls (hermes), reasoning (qwen3) (the Qwen3 family",
     ["--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"], []),
    ("Qwen3-4B-Instruct-2507", "tool calls (hermes) (the Qwen3 Instruct (non-thinking) family",
     ["--tool-call-parser", "hermes"], ["--reasoning-parser"]),
    ("DeepSeek-R1-Distill-Qwen-7B", "reasoning (deepseek_r1) (the DeepSeek-R1 distills family",
     ["--reasoning-parser", "deepseek_r1"], ["--tool-call-parser"]),
    ("Llama-3.1-8B-Instruct", "--chat_template examples/tool_chat_template_llama3.1_json.jinja",
     ["--tool-call-parser", "llama3_json"], ["--reasoning-parser"]),
    ("Llama-2-7b-hf", None, ["--enable-lora"], ["--tool-call-parser", "--reasoning-parser", "--runner"]),
    ("Mistral-7B-Instruct-v0.3", "tool calls (mistral)", ["--tool-call-parser", "mistral"], []),
    ("Mistral-7B-v0.1", None, [], ["--tool-call-parser"]),  # a base model: same architecture, no tool calls
    ("gpt-oss-20b", "(the gpt-oss family", ["--tool-call-parser", "openai", "--reasoning-parser", "openai_gptoss"], []),
    ("bge-base-en-v1.5", "embeddings (BertModel: an encoder without a language-model head)",
     ["--runner", "pooling"], ["--convert", "--enable-lora", "--tool-call-parser"]),
    ("bge-reranker-base", "rerank and score (XLMRobertaForSequenceClassification with one label",
     ["--runner", "pooling"], ["--convert", "--enable-lora"]),
    ("Qwen3-Embedding-0.6B", "embeddings (a sentence-transformers model (modules.json))",
     ["--runner", "pooling", "--convert", "embed"], ["--enable-lora", "--tool-call-parser", "--reasoning-parser"]),
]  # fmt: skip


@pytest.mark.parametrize("name, line, present, absent", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_each_family_gets_its_flags(cli, tmp_path, name, line, present, absent):
    config, result = dryrun(cli, "--name", str(family_folder(tmp_path, name)), *GPU)
    sky_task(config)  # SkyPilot accepts it
    command = command_of(config)
    check_against_vllm(command)
    joined = " ".join(command)
    for part in present:
        assert part in command, joined
    for part in absent:
        assert part not in command, joined
    if "--tool-call-parser" in present:
        assert command[command.index("--tool-call-parser") - 1] == "--enable-auto-tool-choice"
    if line:
        assert line in result.stderr, result.stderr


def test_task_and_parsers_can_be_said(cli, tmp_path):
    qwen = family_folder(tmp_path, "Qwen3-8B")
    config, result = dryrun(cli, "--name", str(qwen), *GPU, "--task", "embed")
    command = command_of(config)
    assert command[-4:] == ["--runner", "pooling", "--convert", "embed"]  # and no LoRA, no parsers
    assert "embeddings (--task)" in result.stderr
    config, _ = dryrun(cli, "--name", str(qwen), *GPU, "--tool_parser", "none", "--reasoning_parser", "none")
    assert not flags_of(command_of(config)) & {"--tool-call-parser", "--reasoning-parser", "--enable-auto-tool-choice"}
    llama2 = family_folder(tmp_path, "Llama-2-7b-hf")
    config, result = dryrun(cli, "--name", str(llama2), *GPU, "--tool_parser", "pythonic")
    assert "--tool-call-parser" in command_of(config) and "pythonic" in command_of(config)
    assert "tool calls (pythonic) (as asked" in result.stderr
    classifier = family_folder(tmp_path, "bge-reranker-base")
    config, _ = dryrun(cli, "--name", str(classifier), *GPU, "--task", "classify")
    assert command_of(config)[-2:] == ["--runner", "pooling"]


def test_hub_ids_out_of_reach_go_by_their_name(cli):
    """The Hub is unreachable here (HF_HUB_OFFLINE=1): the name decides, and serve says so."""
    config, result = dryrun(cli, "--name", "Qwen/Qwen3-8B", *GPU)
    assert {"--tool-call-parser", "--reasoning-parser"} <= flags_of(command_of(config))
    assert "could not read its config.json" in result.stderr and "going by its name" in result.stderr
    config, result = dryrun(cli, "--name", "BAAI/bge-small-en-v1.5", *GPU)
    assert (
        command_of(config)[-2:] == ["--runner", "pooling"] and "the name BAAI/bge-small-en-v1.5 says" in result.stderr
    )
    config, _ = dryrun(cli, "--name", "lmsys/vicuna-13b-v1.3", *GPU)
    assert not flags_of(command_of(config)) & {"--tool-call-parser", "--reasoning-parser", "--runner"}


def test_a_family_parser_the_tokenizer_cannot_start_is_left_off(cli, tmp_path, tiny_model):
    """Mistral's parser needs [TOOL_CALLS]: a Mistral v0.3 folder whose tokenizer lacks it gets none, and serve
    says why; named explicitly, the same parser is refused."""
    folder = family_folder(tmp_path, "Mistral-7B-Instruct-v0.3")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / file, folder / file)
    config, result = dryrun(cli, "--name", str(folder), *GPU)
    assert "--tool-call-parser" not in command_of(config)
    assert "no tool parser: its tokenizer lacks [TOOL_CALLS], which mistral needs" in result.stderr
    refused = cli("serve", "--name", str(folder), *GPU, "--tool_parser", "mistral", "--dryrun")
    assert_one_line_error(refused, "--tool_parser mistral needs the token [TOOL_CALLS]", "vLLM would fail at start-up")


def test_pooling_models_are_sized_without_a_kv_cache(cli, tmp_path, catalog):
    bge = family_folder(tmp_path, "bge-base-en-v1.5")
    planned = json.loads(cli("plan", "--name", str(bge), "--cloud", "gcp", "--json").stdout)
    terms = planned["terms"]
    assert terms["task"] == "embed" and "kv_cache_bytes" not in terms and terms["activation_bytes"] > 0
    assert planned["serving"] == {"task": "embed", "family": None, "vllm_flags": ["--runner", "pooling"]}
    qwen3 = cli("plan", "--name", str(family_folder(tmp_path, "Qwen3-8B")), "--cloud", "gcp")
    assert "Serves: chat and completions, tool calls (hermes), reasoning (qwen3) (the Qwen3 family)" in qwen3.stdout
    assert planned["auto"][0].split(":")[1] == "1"
    qwen = family_folder(tmp_path, "Qwen2.5-0.5B-Instruct")
    chat = json.loads(cli("plan", "--name", str(qwen), "--cloud", "gcp", "--json").stdout)["terms"]
    embed = json.loads(cli("plan", "--name", str(qwen), "--cloud", "gcp", "--task", "embed", "--json").stdout)["terms"]
    assert chat["task"] == "generate" and chat["kv_cache_bytes"] > 0 and "kv_cache_bytes" not in embed
    shown = cli("plan", "--name", str(bge), "--cloud", "gcp")
    assert "embed: a pooling model, no KV cache" in shown.stdout and "KiB/token" not in shown.stdout
    config, _ = dryrun(cli, "--name", str(bge), "--cloud", "gcp", "--accelerator", "auto")
    sky_task(config)
    assert command_of(config)[-2:] == ["--runner", "pooling"]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--tool_parser", "hermess"], ["--tool_parser hermess", "did you mean hermes"]),
        (["--reasoning_parser", "deepseek-r1"], ["--reasoning_parser deepseek-r1", "did you mean deepseek_r1"]),
        (["--task", "embed", "--lora", "a=org/adapter"], ["--lora applies to generative models", "embeddings"]),
        (["--task", "rerank", "--tool_parser", "hermes"], ["--tool_parser applies to generative models"]),
        (["--task", "embed", "--max_loras", "2"], ["--max_loras applies to generative models"]),
        (["--engine", "transformers", "--task", "embed"], ["--task embed needs vLLM"]),
        (["--engine", "transformers", "--reasoning_parser", "qwen3"], ["--reasoning_parser needs vLLM"]),
        (["--vllm_args", "--tool-call-parser hermes"], ["--tool-call-parser is set by llm-atc", "--tool_parser"]),
        (["--vllm_args", "--enable-auto-tool-choice"], ["is set by llm-atc", "--tool_parser"]),
        (["--vllm_args", "--runner pooling"], ["--runner is set by llm-atc", "--task"]),
        (["--vllm_args", "--reasoning-parser qwen3"], ["--reasoning_parser"]),
        (["--name", "org/other", "--task", "embed"], ["--task applies to a deployment of one model"]),
    ],
)
def test_bad_task_and_parser_options_are_one_line(cli, llm_atc_home, args, fragments):
    result = cli("serve", "--name", "Qwen/Qwen3-8B", *args, *GPU, "-y")
    assert_one_line_error(result, *fragments)
    assert not (llm_atc_home / "registry.db").exists() or Registry().records() == []


def test_what_the_model_says_is_checked_before_launching(cli, tmp_path, tiny_model, llm_atc_home):
    """Refusals that need the model read: a pooling model with runtime LoRA or a parser, or on transformers serve;
    a reasoning parser whose think tokens the tokenizer lacks. Nothing is recorded or launched."""
    bge = family_folder(tmp_path, "bge-base-en-v1.5")
    for args, fragments in (
        (["--max_loras", "2"], ["--max_loras/--max_lora_rank", "served for embed"]),
        (["--tool_parser", "hermes"], ["--tool_parser applies to generative models", "served for embed"]),
        (["--engine", "transformers", "--cpus", "2"], ["served for embed", "needs vLLM"]),
    ):
        assert_one_line_error(cli("serve", "--name", str(bge), *GPU, *args, "-y"), *fragments)
    refused = cli("serve", "--name", str(tiny_model), *GPU, "--reasoning_parser", "deepseek_r1", "-y")
    assert_one_line_error(refused, "needs the tokens <think>, </think>", "vLLM would fail at start-up")
    refused = cli("serve", "--name", str(bge), "--cloud", "local", "--engine", "transformers")
    assert_one_line_error(refused, "served for embed", "transformers serve only generates text")
    assert_one_line_error(
        cli("plan", "--name", str(bge), "--task", "embed", "--mode", "lora"), "goes with --mode serve"
    )
    assert not (llm_atc_home / "registry.db").exists() or Registry().records() == []


def test_the_parser_table_is_what_the_pinned_vllm_registers(vllm_engine):
    """data/vllm-parsers.json is what scripts/vllm_parsers.py writes from the installed vLLM: every parser a family
    names is registered there, and the tokens each needs are what vLLM's own start-up check asks for."""
    written = subprocess.run(
        [str(vllm_engine.python), str(ROOT / "scripts" / "vllm_parsers.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert written.returncode == 0, written.stderr[-2000:]
    shipped = json.loads((ROOT / "llm_atc" / "data" / "vllm-parsers.json").read_text())
    assert json.loads(written.stdout) == shipped
    assert shipped["vllm"] == vllm_engine.version and "hermes" in shipped["tool_parsers"]


def test_the_api_key_guards_every_path_of_vllm(vllm_deployment):
    """vLLM 0.32's own key check skips /invocations (chat and completions), /tokenize and /metrics: llm-atc's
    middleware guards them; /health stays open for load balancers."""
    base = vllm_deployment.base_url.removesuffix("/v1")
    body = {"model": vllm_deployment.model, "prompt": "Hi", "max_tokens": 1}
    for path in ("/invocations", "/tokenize"):
        assert httpx.post(base + path, json=body, timeout=30).status_code == 401, path
        keyed = httpx.post(base + path, json=body, headers={"Authorization": f"Bearer {vllm_deployment.api_key}"})
        assert keyed.status_code == 200, (path, keyed.text)
    assert httpx.get(base + "/metrics", timeout=30).status_code == 401
    assert httpx.options(base + "/metrics", timeout=30).status_code == 401  # not a CORS preflight: no way around
    assert httpx.post(base + "/health", timeout=30).status_code == 401
    assert httpx.get(base + "/health", timeout=30).status_code == 200


def test_embeddings_from_a_decoder_through_the_python_api(vllm_engine, tiny_model):
    """``--task embed`` on the tiny Llama: vLLM's pooling runner converts it; the Python API and the openai
    client get one vector of the hidden size per input."""
    import llm_atc

    with llm_atc.serve(str(tiny_model), cloud="local", port=0, task="embed", cluster=unique("embed")) as deployment:
        assert deployment.task == "embed" and deployment.record.details["task"] == "embed"
        vectors = deployment.embed(["alpha beta", "gamma"])
        assert [len(v) for v in vectors] == [128, 128] and vectors[0] != vectors[1]
        reply = deployment.client(max_retries=0).embeddings.create(model=deployment.name, input="alpha beta")
        assert reply.data[0].embedding == pytest.approx(vectors[0], abs=1e-3)
        log = deployment.logs()
        assert "--runner pooling --convert embed" in log and "--enable-lora" not in log
        with pytest.raises(llm_atc.UserError, match="served for embed, not rerank"):
            deployment.rerank("q", ["a"])


def test_a_reasoning_model_starts_with_its_parser(cli, vllm_engine, tmp_path):
    """A DeepSeek-R1 distill (by its name) whose tokenizer has <think> and </think> starts with deepseek_r1, the
    family's reasoning parser; the family has no tool-call parser, so vLLM refuses a named tool_choice there."""
    model = build_family_model(tmp_path / "DeepSeek-R1-Distill-Qwen-tiny", tokens=TOOL_TOKENS + THINK_TOKENS)
    cluster = unique("r1")
    result = cli("serve", "--name", str(model), "--cloud", "local", "--port", "0", "-c", cluster, "--timeout", "600")
    try:
        assert result.exit_code == 0, result
        assert "reasoning (deepseek_r1) (the DeepSeek-R1 distills family" in result.stderr
        record = Registry().find(cluster)
        assert record.details["reasoning_parser"] == "deepseek_r1" and "tool_parser" not in record.details
        client = openai.OpenAI(base_url=record.endpoint + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Think, then answer."}]
        reply = client.chat.completions.create(model=str(model), messages=messages, max_tokens=6, temperature=0)
        message = reply.choices[0].message
        assert (message.reasoning or message.content) and reply.usage.completion_tokens >= 1
        named = {"type": "function", "function": {"name": "get_weather"}}
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        with pytest.raises(openai.BadRequestError, match="requires --tool-call-parser"):
            client.chat.completions.create(model=str(model), messages=messages, tools=[tool], tool_choice=named)
        log = (Path(record.details["log"])).read_text()
        assert "--reasoning-parser deepseek_r1" in log
    finally:
        cli("stop", cluster)


def test_a_pooling_model_here_needs_vllm(cli, tmp_path, monkeypatch):
    """Locally, --engine auto falls back to transformers serve only for a model that generates."""
    monkeypatch.setenv("LLM_ATC_ENGINES", str(tmp_path / "no-engines"))
    bge = family_folder(tmp_path, "bge-base-en-v1.5")
    result = cli("serve", "--name", str(bge), "--cloud", "local", "-c", unique("bge"))
    assert_one_line_error(result, "serving a model for embed on this machine needs the vllm engine", "engines install")
