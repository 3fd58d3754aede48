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
from conftest import VLLM_KEY, assert_one_line_error, sharegpt, train_args, unique, upload_folder

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
    before = moto_log.read_text().count(f"GET /{bucket}/llm-atc/{run}/model.safetensors")
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
        ranged = [
            line
            for line in moto_log.read_text().splitlines()
            if f"GET /{bucket}/llm-atc/{run}/model.safetensors" in line
        ][before:]
        assert ranged and all(" 206 " in line for line in ranged), ranged[:3]  # ranged reads, no full download
        engine_cache = Path.home() / ".cache" / "vllm"  # where vLLM keeps the streamed model's small files
        on_disk = [p for root in (llm_atc_home, engine_cache) for p in root.rglob("*.safetensors")]
        assert on_disk == [], on_disk  # nothing of the weights written to this "node's" disk
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


def test_copy_stays_the_fallback_and_says_why(cli, s3_checkpoint, tmp_path):
    """--weights copy copies; a transformers deployment copies (one line says why); --weights stream where it
    cannot work is refused before anything launches."""
    copied = cli(
        "serve", "--name", "llm-atc/tiny", "--source", s3_checkpoint, "--cloud", "gcp", "--weights", "copy", "--dryrun"
    )
    assert copied.exit_code == 0, copied
    config = yaml.safe_load(copied.stdout)
    assert config["file_mounts"]["/llm-atc/model"] == {"source": s3_checkpoint, "mode": "COPY"}
    assert "copied to the node" in copied.stderr
    streamed = cli("serve", "--name", "llm-atc/tiny", "--source", s3_checkpoint, "--cloud", "gcp", "--dryrun")
    assert streamed.exit_code == 0, streamed
    config = yaml.safe_load(streamed.stdout)
    argv = shlex.split(config["envs"]["VLLM_COMMAND"])
    assert argv[argv.index("--model") + 1] == s3_checkpoint and "runai_streamer" in argv
    assert "/llm-atc/model" not in (config.get("file_mounts") or {}) and "streamed from" in streamed.stderr
    for credential in ("testing",):  # the store settings and keys given with --envs stay out of the YAML
        assert credential not in streamed.stdout
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
