"""Weights streamed from the bucket into vLLM (Run:ai's model streamer), with no copy to disk first.

Real parts only: vLLM's CPU build, a run trained by `llm-atc train` into moto (S3) and the GCS
emulator, and their own logs as witnesses: the streamer's log line in vLLM's, ranged GETs in moto's.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from support.buckets import upload_folder, weight_reads
from support.cli import assert_one_line_error, unique
from support.training import sharegpt, train_args
from support.vllm_setup import VLLM_KEY

ENGINE_ENVS = "VLLM_CPU_KVCACHE_SPACE=1"


def serve_local(cli, name: str, cluster: str, *extra: str):
    return cli(
        "serve",
        "--name",
        name,
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
        "--vllm_args",
        "--enforce-eager",
        "--timeout",
        "600",
        *extra,
    )


@pytest.fixture
def trained_in_s3(cli, s3, moto_endpoint, tiny_model, tmp_path):
    """A merged LoRA run trained by `llm-atc train --cloud local` into a moto bucket."""
    bucket = unique("stream")
    s3.create_bucket(Bucket=bucket)
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(sharegpt()))
    run = unique("streamed-run")
    result = cli(
        *train_args(
            data,
            tiny_model,
            run,
            "--checkpoint_bucket",
            bucket,
            "--checkpoint_store",
            "S3",
            "--envs",
            "MAX_STEPS=2 MAX_SEQ_LEN=64 BATCH_SIZE=2",
        )
    )
    assert result.exit_code == 0, result
    return run, bucket


def test_a_run_in_s3_is_streamed_into_vllm_without_a_copy_on_disk(
    cli, vllm_engine, trained_in_s3, session_dir, llm_atc_home
):
    run, bucket = trained_in_s3
    moto_log = session_dir / "moto.log"
    before = len(weight_reads(moto_log, f"{bucket}/llm-atc/{run}/model.safetensors"))
    engine_cache = Path.home() / ".cache" / "vllm"  # where vLLM keeps a streamed model's small files
    weights_before = {p for root in (llm_atc_home, engine_cache) for p in root.rglob("*.safetensors")}
    cluster = unique("streamed")
    result = serve_local(cli, f"llm-atc/{run}", cluster, "--envs", ENGINE_ENVS, "--secret", f"VLLM_API_KEY={VLLM_KEY}")
    try:
        assert result.exit_code == 0, result
        assert "streamed from" in result.stderr
        from llm_atc.registry import Registry

        record = Registry().find(cluster)
        log = (llm_atc_home / "local" / cluster / "server.log").read_text()
        assert "Runai Model Streamer" in log  # vLLM's own line: the streamer loaded the weights
        command = next(line for line in log.splitlines() if line.startswith("llm-atc: starting "))
        argv = shlex.split(command.removeprefix("llm-atc: starting "))
        assert argv[argv.index("--model") + 1] == f"s3://{bucket}/llm-atc/{run}"
        assert argv[argv.index("--load-format") + 1] == "runai_streamer"
        ranged = weight_reads(moto_log, f"{bucket}/llm-atc/{run}/model.safetensors")[before:]
        assert ranged and all(" 206 " in line for line in ranged), ranged[:3]  # ranged reads, no full download
        weights_after = {p for root in (llm_atc_home, engine_cache) for p in root.rglob("*.safetensors")}
        assert weights_after == weights_before, weights_after - weights_before  # no weights written to disk
        from openai import OpenAI

        client = OpenAI(base_url=record.endpoint + "/v1", api_key=VLLM_KEY, max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model=f"llm-atc/{run}", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
        )
        assert reply.choices[0].message.content is not None
    finally:
        cli("stop", cluster)


def test_a_gcs_checkpoint_is_streamed_too(cli, vllm_engine, gcs, gcs_endpoint, tiny_model, llm_atc_home):
    bucket = gcs.create_bucket(unique("gcs-stream"))
    upload_folder(tiny_model, lambda name, path: bucket.blob(f"llm-atc/tiny/{name}").upload_from_filename(str(path)))
    cluster = unique("gcs-streamed")
    result = serve_local(
        cli,
        "llm-atc/tiny",
        cluster,
        "--source",
        f"gs://{bucket.name}/llm-atc/tiny",
        "--envs",
        f"{ENGINE_ENVS} STORAGE_EMULATOR_HOST={gcs_endpoint}",
    )
    try:
        assert result.exit_code == 0, result
        log = (llm_atc_home / "local" / cluster / "server.log").read_text()
        assert "Runai Model Streamer" in log
        assert list(llm_atc_home.rglob("*.safetensors")) == []
    finally:
        cli("stop", cluster)


def test_copy_stays_the_fallback_and_says_why(cli, s3_checkpoint, moto_endpoint):
    """--weights copy copies; a transformers deployment copies (one line says why); --weights stream where it
    cannot work is refused before anything launches."""
    copied = cli(
        "serve", "--name", "llm-atc/tiny", "--source", s3_checkpoint, "--cloud", "gcp", "--weights", "copy", "--dryrun"
    )
    assert copied.exit_code == 0, copied
    config = yaml.safe_load(copied.stdout)
    assert config["file_mounts"]["/llm-atc/model"] == {"source": s3_checkpoint, "mode": "COPY"}
    assert f"copied from {s3_checkpoint} to the node before the engine starts (--weights copy)" in copied.stderr
    streamed = cli(
        "serve",
        "--name",
        "llm-atc/tiny",
        "--source",
        s3_checkpoint,
        "--cloud",
        "gcp",
        "--envs",
        f"AWS_ENDPOINT_URL={moto_endpoint}",
        "--secret",
        "AWS_ACCESS_KEY_ID=streamer-key-id",
        "--secret",
        "AWS_SECRET_ACCESS_KEY=streamer-secret-value",
        "--dryrun",
    )
    assert streamed.exit_code == 0, streamed
    config = yaml.safe_load(streamed.stdout)
    argv = shlex.split(config["envs"]["VLLM_COMMAND"])
    assert argv[argv.index("--model") + 1] == s3_checkpoint
    assert argv[argv.index("--load-format") + 1] == "runai_streamer"
    assert "/llm-atc/model" not in (config.get("file_mounts") or {}) and not config["envs"]["MODEL_SOURCE"]
    assert f"streamed from {s3_checkpoint}" in streamed.stderr
    # The streamer reads the store settings from the task's envs, the keys from its secrets: names only.
    assert config["envs"]["AWS_ENDPOINT_URL"] == moto_endpoint
    assert config["secrets"]["AWS_ACCESS_KEY_ID"] is None and config["secrets"]["AWS_SECRET_ACCESS_KEY"] is None
    assert "streamer-secret-value" not in streamed.stdout + streamed.stderr
    transformers = cli(
        "serve",
        "--name",
        "llm-atc/tiny",
        "--source",
        s3_checkpoint,
        "--cloud",
        "gcp",
        "--engine",
        "transformers",
        "--dryrun",
    )
    assert transformers.exit_code == 0 and "transformers serve cannot stream" in transformers.stderr
    assert_one_line_error(
        cli(
            "serve",
            "--name",
            "llm-atc/tiny",
            "--source",
            s3_checkpoint,
            "--cloud",
            "gcp",
            "--engine",
            "transformers",
            "--weights",
            "stream",
            "--dryrun",
        ),
        "--weights stream",
        "transformers",
    )
    assert_one_line_error(
        cli("serve", "--name", "Qwen/Qwen2.5-7B", "--cloud", "gcp", "--weights", "stream", "--dryrun"),
        "--weights stream",
        "bucket",
    )


def test_a_bucket_the_node_cannot_read_fails_in_one_line(cli, vllm_engine, s3, tiny_model):
    """The checkpoint looks right to llm-atc's check, but its weights cannot be read by the engine: one
    line with vLLM's log tail, FAILED, and nothing left running."""
    bucket = unique("unreadable")
    s3.create_bucket(Bucket=bucket)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        s3.upload_file(str(tiny_model / name), bucket, f"llm-atc/broken/{name}")
    s3.put_object(Bucket=bucket, Key="llm-atc/broken/model.safetensors", Body=b"not safetensors at all")
    cluster = unique("unreadable")
    result = serve_local(
        cli, "llm-atc/broken", cluster, "--source", f"s3://{bucket}/llm-atc/broken", "--envs", ENGINE_ENVS
    )
    assert_one_line_error(result, "the engine exited")
    from llm_atc.registry import Registry

    record = Registry().find(cluster)
    assert record.status == "FAILED"
    import psutil

    assert not psutil.pid_exists(record.pid) or psutil.Process(record.pid).status() == psutil.STATUS_ZOMBIE


def test_plan_says_how_the_weights_will_load(cli, catalog, s3_checkpoint):
    table = cli("plan", "--name", "llm-atc/tiny", "--source", s3_checkpoint)
    assert table.exit_code == 0, table
    assert f"Weights: streamed from {s3_checkpoint} into vLLM" in table.stdout
    as_json = cli("plan", "--name", "llm-atc/tiny", "--source", s3_checkpoint, "--json")
    assert as_json.exit_code == 0, as_json
    assert json.loads(as_json.stdout)["weights"]["stream"] is True
    trained = cli("plan", "--name", "llm-atc/tiny", "--source", s3_checkpoint, "--mode", "lora", "--json")
    assert trained.exit_code == 0 and "weights" not in json.loads(trained.stdout)  # only serving loads weights


def test_a_replica_streams_a_complete_weights_cache(
    cli, vllm_engine, s3, moto_endpoint, tiny_model, tmp_path, session_dir
):
    """--cache_weights: once a first replica has staged the model in the cache, the next node streams
    it from there. The recipe's own `run` (rendered by --dryrun) runs here in bash as the node, with
    the real vLLM; only the address it binds is narrowed to 127.0.0.1."""
    import os
    import shutil
    import signal
    import subprocess
    import time

    from support.net import free_port, wait_http

    bucket, hub_id = unique("cache"), "llm-atc-test/tiny"
    s3.create_bucket(Bucket=bucket)
    upload_folder(tiny_model, lambda name, path: s3.upload_file(str(path), bucket, f"cache/{hub_id}/{name}"))
    s3.put_object(Bucket=bucket, Key=f"cache/{hub_id}/.llm-atc-staged", Body=hub_id.encode())
    port = free_port()
    rendered = cli(
        "serve",
        "--name",
        hub_id,
        "--cache_weights",
        f"s3://{bucket}/cache",
        "--accelerator",
        "none",
        "--cpus",
        "2",
        "--port",
        str(port),
        "--max_model_len",
        "128",
        "--vllm_args",
        "--enforce-eager",
        "--envs",
        f"AWS_ENDPOINT_URL={moto_endpoint} {ENGINE_ENVS}",
        "--dryrun",
    )
    assert rendered.exit_code == 0, rendered
    assert "later ones stream it from there" in rendered.stderr
    config = yaml.safe_load(rendered.stdout)
    node_home = tmp_path / "node"
    for target, source in config["file_mounts"].items():  # SkyPilot's sync of this machine's files
        assert target.startswith("~/.llm-atc/"), target
        (node_home / target[2:]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, node_home / target[2:])
    envs = {k: "" if v is None else str(v) for k, v in config["envs"].items()}
    envs["VLLM_COMMAND"] = envs["VLLM_COMMAND"].replace("--host 0.0.0.0", "--host 127.0.0.1")
    env = {**os.environ, **envs, "HOME": str(node_home), "LLM_ATC_VLLM_ENV": str(vllm_engine.path)}
    reads_before = len(weight_reads(session_dir / "moto.log", f"{bucket}/cache/{hub_id}/model.safetensors"))
    log = tmp_path / "node.log"
    with log.open("w") as out:
        node = subprocess.Popen(
            ["bash", "-c", config["run"]], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600
        while node.poll() is None and time.monotonic() < deadline:
            try:
                wait_http(f"http://127.0.0.1:{port}/health", 5)
                break
            except Exception:
                continue
        assert node.poll() is None, log.read_text()[-3000:]
        text = log.read_text()
        assert f"streaming the weights from the weights cache s3://{bucket}/cache/{hub_id}" in text, text[-3000:]
        assert "Loading safetensors using Runai Model Streamer" in text
        reads = weight_reads(session_dir / "moto.log", f"{bucket}/cache/{hub_id}/model.safetensors")[reads_before:]
        assert reads and all(" 206 " in line for line in reads)
        assert not (node_home / "llm-atc" / "weights").exists()  # nothing staged on this node's disk
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(60)
