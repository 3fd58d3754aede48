"""The first hour of a new user (#27): local training with no network and no --base_model, one rule for unknown
names in every command, help that guides and tells the truth, an engine that can run the model, "ready" meaning
answered, nothing left running after a crash, and hostile inputs refused in one line before anything starts."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
from support.cli import assert_one_line_error, unique
from support.net import free_port
from support.paths import BIN, ROOT
from support.processes import group_of
from support.tiny_models import build_head16_model
from support.training import sharegpt

from llm_atc.registry import Registry, Status

QUICK = ["--envs", "MAX_STEPS=2 MAX_SEQ_LEN=64 BATCH_SIZE=2"]


@pytest.fixture
def chats(tmp_path) -> Path:
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(sharegpt()))
    return path


def test_train_here_offline_without_a_base_then_serve_and_chat(cli, vllm_engine, chats, llm_atc_home):
    """No --base_model, no network (HF_HUB_OFFLINE=1): the run trains llm-atc-demo, its model serves, it chats;
    and when the engine's leader is killed (as the OOM killer would), the rest of its group goes with it."""
    run = unique("first")
    trained = cli("train", "--model_type", "lora", "--finetune_data", str(chats), "--cloud", "local", "--name", run,
                  *QUICK)  # fmt: skip
    assert trained.exit_code == 0, trained
    (record,) = Registry().records(kind="train")
    assert record.status == Status.SUCCEEDED and record.model == str(llm_atc_home / "demo" / "llm-atc-demo")
    cluster = unique("first-srv")
    served = cli("serve", "--name", f"llm-atc/{run}", "--cloud", "local", "--port", "0", "-c", cluster)
    assert served.exit_code == 0, served
    deployment = Registry().find(cluster)
    reply = httpx.post(
        deployment.endpoint + "/v1/chat/completions",
        json={"model": f"llm-atc/{run}", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"

    group = group_of(deployment.pid)
    assert len(group) >= 2  # vLLM's API server and its engine core (and worker)
    leader = psutil.Process(deployment.pid)
    leader.kill()
    psutil.wait_procs([leader], timeout=30)
    assert group_of(deployment.pid)  # its engine core outlives it: status must end it
    status = cli("status", cluster)
    assert "FAILED" in status.stdout, status
    assert group_of(deployment.pid) == []  # FAILED means nothing of it still runs or holds memory


def test_the_demo_model_is_a_base_by_name_and_a_hub_base_is_checked(cli, chats, llm_atc_home, s3):
    s3.create_bucket(Bucket="first-hour")
    bucket = ["--checkpoint_bucket", "first-hour", "--checkpoint_store", "S3"]
    config = cli("train", "--model_type", "lora", "--finetune_data", str(chats), "--base_model", "llm-atc-demo",
                 "--cloud", "aws", "--accelerator", "L4:1", *bucket, "--dryrun")  # fmt: skip
    assert config.exit_code == 0, config
    assert "~/llm-atc/base" in config.stdout and "MODEL_BASE: ~/llm-atc/base" in config.stdout
    refused = cli("train", "--model_type", "lora", "--finetune_data", str(chats), "--cloud", "local",
                  "--base_model", "Qwen/Qwen2.5-0.5B")  # fmt: skip
    assert_one_line_error(refused, "--base_model Qwen/Qwen2.5-0.5B", "Hub cannot be reached", "llm-atc-demo")
    cloud = cli("train", "--model_type", "lora", "--finetune_data", str(chats), "--cloud", "aws",
                "--accelerator", "L4:1", "--base_model", "Qwen/Qwen2.5-0.5B", *bucket, "--dryrun")  # fmt: skip
    assert cloud.exit_code == 0 and "the node downloads it" in cloud.stderr, cloud
    assert Registry().records() == []


def test_a_training_failure_is_its_exception_line_not_a_traceback(cli, chats, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    result = cli("train", "--model_type", "lora", "--finetune_data", str(chats), "--cloud", "local",
                 "--base_model", str(broken), "--name", unique("broken"), *QUICK)  # fmt: skip
    assert_one_line_error(result, "failed (exit code", "the whole log:")
    assert "Traceback" not in result.stderr and "no-such-architecture" in result.stderr
    assert "--resume" not in result.stderr  # no checkpoint was written, so there is nothing to resume


@pytest.mark.parametrize(
    "command",
    [
        ["status", "tiny-srvv"],
        ["endpoint", "tiny-srvv"],
        ["logs", "tiny-srvv"],
        ["stop", "tiny-srvv"],
        ["down", "tiny-srvv"],
        ["adapters", "list", "tiny-srvv"],
        ["bench", "tiny-srvv"],
    ],
)
def test_an_unknown_name_is_one_line_with_the_closest(cli, command):
    from llm_atc.registry import Record

    Registry().add(
        Record(name="tiny", kind="serve", model="m", cluster="tiny-srv", status=Status.STOPPED, cloud="local")
    )
    result = cli(*command)  # no -y and no terminal: anything asked would fail differently
    assert_one_line_error(result, "named 'tiny-srvv'", "did you mean tiny-srv")
    assert result.exit_code == 3


def test_a_lookup_through_skypilot_leaves_no_server_behind(tmp_path):
    """`logs` of a name llm-atc does not know asks SkyPilot whether it is a cluster of its own; the API server
    started for the question is stopped again."""
    port = free_port()
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "LLM_ATC_HOME": str(tmp_path / "h"),
        "SKYPILOT_API_SERVER_LOCAL_PORT": str(port),
    }
    done = subprocess.run([str(BIN / "llm-atc"), "logs", "no-such-cluster"], env=env, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: no deployment or training run named")
    assert "SkyPilot API server" not in done.stderr + done.stdout  # its own chatter stays off the terminal
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listens there any more


def test_help_guides_and_says_what_the_code_does(cli):
    from llm_atc.engine_rule import ENGINE_AUTO_RULE

    top = cli("--help").stdout
    assert "llm-atc serve --cloud local" in top and "--cloud local runs everything" in top
    serve = cli("serve", "--help").stdout
    sections = [line for line in serve.splitlines() if re.fullmatch(r"[A-Z][\w ()]+:", line)]
    assert sections == ["What to serve:", "Where it runs:", "Engine:", "Scaling (a SkyServe service):",
                        "Lifetime and cost:", "Security:", "Launching:"]  # fmt: skip
    flat = lambda text: " ".join(text.split())
    assert flat(ENGINE_AUTO_RULE) in flat(serve)
    assert flat(ENGINE_AUTO_RULE) in flat((ROOT / "docs" / "serving.md").read_text())
    train = cli("train", "--help").stdout
    assert "What to train:" in train and "llm-atc-demo" in train


def test_auto_picks_an_engine_that_can_run_the_model(cli, vllm_engine, tmp_path):
    """vLLM's CPU build has no attention kernel for head size 16: `auto` serves such a model with transformers
    and says why; `--engine vllm` starts it, and its first request fails at launch (FAILED, nothing left)."""
    model = build_head16_model(tmp_path / "tiny16")
    cluster = unique("h16")
    served = cli("serve", "--name", str(model), "--cloud", "local", "--port", "0", "-c", cluster)
    try:
        assert served.exit_code == 0, served
        assert "has no attention kernel for" in served.stderr and "head size 16" in served.stderr
        record = Registry().find(cluster)
        assert record.engine == "transformers"
        chat = {"model": str(model), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        reply = httpx.post(record.endpoint + "/v1/chat/completions", json=chat, timeout=60)
        assert reply.status_code == 200
    finally:
        cli("stop", cluster)
    forced = unique("h16v")
    result = cli("serve", "--name", str(model), "--cloud", "local", "--engine", "vllm", "--port", "0", "-c", forced)
    assert_one_line_error(result, "the engine is up but failed its first request", "answered 500 on /v1/completions")
    assert "its first request will fail" in result.stderr and "The end of its log" in result.stderr
    record = Registry().find(forced)
    assert record.status == Status.FAILED and group_of(record.pid) == []


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--finetune_data", "{tmp}"], ["is a folder", "give the data file"]),
        (["--finetune_data", "{fifo}"], ["is not a regular file"]),
        (["--finetune_data", "{chats}", "--envs", "EPOCHS=abc"], ["--envs EPOCHS='abc' is not a number"]),
        (["--finetune_data", "{chats}", "--envs", "LR=5"], ["--envs LR=5 must be from"]),
        (["--finetune_data", "{chats}", "--envs", "LORA_R=0"], ["--envs LORA_R=0 must be from 1"]),
        (["--finetune_data", "{chats}", "--envs", "MAX_STEPS=0"], ["MAX_STEPS=0: give -1"]),
        (["--finetune_data", "{chats}", "--envs", "BATCH_SIZE=1.5"], ["BATCH_SIZE='1.5' is not a whole number"]),
    ],
)
def test_hostile_training_inputs_are_one_line(cli, tmp_path, chats, args, fragments, llm_atc_home):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = [a.format(tmp=tmp_path, fifo=fifo, chats=chats) for a in args]
    result = cli("train", "--model_type", "lora", *args, "--cloud", "local")
    assert_one_line_error(result, *fragments)
    assert not (llm_atc_home / "demo").exists()  # refused before the base model was even built
    assert not (llm_atc_home / "registry.db").exists() or Registry().records() == []


def test_plan_bounds_the_context_as_serve_does(cli):
    result = cli("plan", "--name", "Qwen/Qwen2.5-7B", "--max_model_len", "99999999999")
    assert_one_line_error(result, "--max_model_len 99999999999", "between 1 and")


def test_ctrl_c_while_a_local_serve_waits_says_the_engine_stopped(tiny_model, tmp_path):
    env = {**os.environ, "LLM_ATC_HOME": str(tmp_path / "home"), "LLM_ATC_ENGINES": str(tmp_path / "no-engines")}
    process = subprocess.Popen(
        [str(BIN / "llm-atc"), "serve", "--name", str(tiny_model), "--cloud", "local", "--port", "0", "-c", "ctrlc"],
        env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    import selectors

    seen = ""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while "Starting transformers" not in seen and time.monotonic() < deadline and process.poll() is None:
            if selector.select(timeout=1):
                seen += process.stderr.readline()
    assert "Starting transformers" in seen, seen
    process.send_signal(signal.SIGINT)  # while it waits for the engine (loading takes seconds)
    rest = process.communicate(timeout=60)[1]
    assert process.returncode == 130, seen + rest
    assert "Stopped ctrlc: its engine ended with the interruption, nothing is left running." in rest
    assert rest.strip().splitlines()[-1] == "Error: interrupted"


def test_library_chatter_stays_in_the_log_file(tmp_path, chats):
    """huggingface_hub's retry lines and internal errors go to $LLM_ATC_HOME/logs/llm-atc.log; the user gets one
    line naming it."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(LLM_ATC_HOME=str(tmp_path / "home"), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2")
    done = subprocess.run(
        [str(BIN / "llm-atc"), "train", "--model_type", "lora", "--finetune_data", str(chats), "--cloud", "local",
         "--base_model", "someone/unreachable"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: --base_model someone/unreachable: the Hugging Face Hub cannot be reached")
    assert "Retry" not in done.stderr and "Traceback" not in done.stderr
    log = tmp_path / "home" / "logs" / "llm-atc.log"
    assert str(log) in last and log.stat().st_mode & 0o777 == 0o600


def test_the_cpu_kernel_list_is_the_installed_builds(vllm_engine):
    written = subprocess.run([str(vllm_engine.python), str(ROOT / "scripts" / "vllm_cpu.py")], capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert written.returncode == 0, written.stderr[-2000:]
    assert json.loads(written.stdout) == json.loads((ROOT / "llm_atc" / "data" / "vllm-cpu.json").read_text())
