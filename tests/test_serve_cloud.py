"""`llm-atc serve` on a cloud: the rendered task (validated by SkyPilot itself), inputs, and launch.

The one part that cannot run here, a cloud provisioning a GPU VM, is replaced by a
recording stand-in for SkyPilot's client SDK (``support.sky_boundary.FakeSky``); the tests assert on the
exact ``sky.Task`` and arguments handed to it. Everything else is real.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from support.cli import assert_one_line_error
from support.dryrun import command_of, dryrun, flag, sky_task
from support.sky_boundary import FakeServe
from support.vllm_setup import VLLM_KEY

from llm_atc.recipes_catalog import recipes_dir

SECRET = "hf_SECRETVALUE123"


def test_dryrun_prints_only_a_task_skypilot_accepts(cli, llm_atc_home):
    config, result = dryrun(
        cli,
        "--name",
        "lmsys/vicuna-13b-v1.3",
        "--accelerator",
        "A100-80GB:2",
        "--cloud",
        "gcp",
        "--region",
        "us-central1",
        "--envs",
        f"HF_TOKEN={SECRET} MODEL_SIZE=7",
        "--max_model_len",
        "4096",
        "--dtype",
        "bfloat16",
        "--use_spot",
        "--disk_size",
        "512",
    )
    task = sky_task(config)
    (resources,) = task.resources
    assert resources.accelerators == {"A100-80GB": 2}
    assert str(resources.cloud) == "GCP" and resources.region == "us-central1"
    assert resources.ports == ["8000"] and resources.use_spot and resources.disk_size == 512
    assert task.envs["MODEL_NAME"] == "lmsys/vicuna-13b-v1.3"
    assert task.envs["SERVED_MODEL_NAME"] == "lmsys/vicuna-13b-v1.3"
    assert task.envs["MODEL_SIZE"] == "7"
    assert config["secrets"] == {"HF_TOKEN": None, "VLLM_API_KEY": None}  # names only: values go in at launch
    assert config["name"] == "llm-atc-vicuna-13b-v1-3"
    assert command_of(config) == [
        "python3",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "lmsys/vicuna-13b-v1.3",
        "--served-model-name",
        "lmsys/vicuna-13b-v1.3",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--tensor-parallel-size",
        "2",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "4096",
        # The API key on every path of the server (vLLM's own guards /v1 only).
        "--middleware",
        "llm_atc_vllm_auth.RequireKey",
        # Runtime LoRA, on by default: `llm-atc adapters add` loads adapters into the running server.
        "--enable-lora",
        "--max-lora-rank",
        "64",
        "--max-loras",
        "4",
    ]
    assert task.envs["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert SECRET not in result.stdout + result.stderr
    assert not (llm_atc_home / "registry.db").exists() or _records() == []


def _records():
    from llm_atc.registry import Registry

    return Registry().records()


def test_dryrun_is_pure_yaml_on_stdout(cli):
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B-Instruct", "--dryrun")
    assert result.exit_code == 0, result
    assert result.stdout.startswith("name: llm-atc-qwen2-5-7b-instruct\n")
    assert isinstance(yaml.safe_load(result.stdout), dict)


def test_comma_list_is_any_of(cli):
    config, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", "--accelerator", "A100:1,L4:2")
    assert config["resources"]["any_of"] == [{"accelerators": "A100:1"}, {"accelerators": "L4:2"}]
    task = sky_task(config)
    assert sorted(str(r.accelerators) for r in task.resources) == ["{'A100': 1}", "{'L4': 2}"]


def test_recipe_runs_on_its_own_with_skypilot():
    from llm_atc.recipes_catalog import all_recipes

    serve_recipes = [r for r in all_recipes() if r.kind == "serve"]
    assert {r.name for r in serve_recipes} >= {"vllm", "transformers"}
    for recipe in serve_recipes:
        task = sky_task(recipe.load())
        assert "MODEL_NAME" in task.envs and "HF_TOKEN" in task.secrets


def test_bucket_checkpoint_is_checked_and_streamed(cli, s3_checkpoint):
    config, _ = dryrun(cli, "--name", "llm-atc/tiny", "--source", s3_checkpoint, "--accelerator", "L4")
    task = sky_task(config)
    assert set(config["file_mounts"]) == {"~/.llm-atc/llm_atc_vllm_auth.py"}  # the key's guard, no weights
    assert not task.storage_mounts
    assert task.envs["MODEL_NAME"] == s3_checkpoint
    assert flag(command_of(config), "--model") == s3_checkpoint
    assert flag(command_of(config), "--load-format") == "runai_streamer"
    assert task.envs["SERVED_MODEL_NAME"] == "llm-atc/tiny"


def test_bucket_checkpoint_is_copied_with_weights_copy(cli, s3_checkpoint):
    config, _ = dryrun(
        cli, "--name", "llm-atc/tiny", "--source", s3_checkpoint, "--accelerator", "L4", "--weights", "copy"
    )
    task = sky_task(config)
    assert config["file_mounts"]["/llm-atc/model"] == {"source": s3_checkpoint, "mode": "COPY"}
    assert "/llm-atc/model" in task.storage_mounts
    assert task.envs["MODEL_NAME"] == "/llm-atc/model" and "--load-format" not in command_of(config)


def test_adapter_checkpoint_is_served_as_lora_on_its_base(cli, s3):
    bucket = "adapters"
    s3.create_bucket(Bucket=bucket)
    adapter = {"base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "r": 64, "peft_type": "LORA"}
    s3.put_object(Bucket=bucket, Key="llm-atc/ad/adapter_config.json", Body=json.dumps(adapter).encode())
    config, _ = dryrun(cli, "--name", "llm-atc/ad", "--source", f"s3://{bucket}/llm-atc/ad", "--accelerator", "L4")
    assert config["envs"]["MODEL_NAME"] == "meta-llama/Llama-2-7b-hf"
    assert command_of(config)[-7:] == [
        "--enable-lora",
        "--lora-modules",
        "llm-atc/ad=/llm-atc/model",
        "--max-lora-rank",
        "64",
        "--max-loras",
        "4",
    ]
    off, _ = dryrun(
        cli, "--name", "llm-atc/ad", "--source", f"s3://{bucket}/llm-atc/ad", "--accelerator", "L4", "--max_loras", "0"
    )
    assert command_of(off)[-5:] == [
        "--enable-lora",
        "--lora-modules",
        "llm-atc/ad=/llm-atc/model",
        "--max-lora-rank",
        "64",
    ]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in off["envs"]
    plain, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", "--max_loras", "0")
    assert "--enable-lora" not in command_of(plain)
    bigger, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", "--max_loras", "8", "--max_lora_rank", "256")
    assert command_of(bigger)[-5:] == ["--enable-lora", "--max-lora-rank", "256", "--max-loras", "8"]


def test_gcs_checkpoint_from_registry(cli, gcs_checkpoint):
    from llm_atc.registry import Record, Registry

    Registry().add(
        Record(name="tiny", kind="train", model="base", cluster="t", status="SUCCEEDED", checkpoint_uri=gcs_checkpoint)
    )
    config, _ = dryrun(cli, "--name", "llm-atc/tiny", "--accelerator", "T4")
    assert flag(command_of(config), "--model") == gcs_checkpoint


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--name", "llm-atc/nothing"], "--source"),
        (["--name", "llm-atc/x", "--source", "https://example.com/x"], "s3://"),
        (["--name", "m/m", "--accelerator", "A100:0"], "at least 1"),
        (["--name", "m/m", "--accelerator", "A100:x"], "whole number"),
        (["--name", "m/m", "--accelerator", ":2"], "missing GPU name"),
        (["--name", "m/m", "--accelerator", "A1000"], "A100"),
        (["--name", "m/m", "--envs", "1BAD=x"], "not a valid variable name"),
        (["--name", "m/m", "--envs", "MODEL_NAME=x"], "MODEL_NAME"),
        (["--name", "m/m", "--cloud", "gcpp"], "gcp"),
        (["--name", "m/m", "--region", "us-east-1"], "--region needs --cloud"),
        (["--name", "x; touch /tmp/pwned"], "not a Hugging Face model id"),
        (["--name", "m/m", "-c", "Bad_Name"], "not a valid cluster name"),
        (["--name", "m/m", "--vllm_args", "'unbalanced"], "--vllm_args"),
        (["--name", "m/m", "--engine", "transformers", "--quantization", "awq"], "--engine vllm"),
    ],
)
def test_bad_input_is_one_line_and_launches_nothing(cli, args, fragment):
    result = cli("serve", *args, "--dryrun")
    assert_one_line_error(result, fragment)
    assert result.stdout == ""


def test_missing_bucket_and_prefix_are_one_line_errors(cli, s3, gcs):
    result = cli("serve", "--name", "llm-atc/x", "--source", "s3://no-such-bucket/llm-atc/x", "--dryrun")
    assert_one_line_error(result, "no-such-bucket")
    s3.create_bucket(Bucket="empty-bucket")
    result = cli("serve", "--name", "llm-atc/x", "--source", "s3://empty-bucket/llm-atc/x", "--dryrun")
    assert_one_line_error(result, "empty-bucket/llm-atc/x")
    result = cli("serve", "--name", "llm-atc/x", "--source", "gs://no-such-gcs/llm-atc/x", "--dryrun")
    assert_one_line_error(result, "no-such-gcs")


def test_user_values_stay_data_in_the_engine_command(cli, tmp_path):
    """--vllm_args and --envs values reach the task as data: quoted in the command, never evaluated
    (tests/test_vllm.py runs such a command on the real vLLM and reads the values back)."""
    marker = tmp_path / "pwned"
    config, _ = dryrun(
        cli,
        "--name",
        "Qwen/Qwen2.5-7B",
        "--envs",
        f"NOTE='$(touch {marker})'",
        "--vllm_args",
        f'--response-role "$(touch {marker})" --enable-prefix-caching',
    )
    assert config["envs"]["NOTE"] == f"$(touch {marker})"
    command = command_of(config)
    assert flag(command, "--response-role") == f"$(touch {marker})"
    assert command[-1] == "--enable-prefix-caching"
    assert not marker.exists()


KEY = ("--secret", f"VLLM_API_KEY={VLLM_KEY}")  # the key the session's vLLM server wants


def test_launch_hands_skypilot_the_exact_task(cli, fake_sky, s3_checkpoint, llm_atc_home):
    sky = fake_sky()
    result = cli(
        "serve",
        "--name",
        "llm-atc/tiny",
        "--source",
        s3_checkpoint,
        "--accelerator",
        "L4:1",
        "--cloud",
        "aws",
        "--region",
        "us-east-1",
        "-c",
        "tiny-srv",
        "--secret",
        f"HF_TOKEN={SECRET}",
        "--no_setup",
        "-y",
        *KEY,
    )
    assert result.exit_code == 0, result
    ((task, kwargs),) = sky.launches
    assert kwargs == {"cluster_name": "tiny-srv", "no_setup": True, "down": True}  # the engine's end ends it
    (resources,) = task.resources
    assert resources.accelerators == {"L4": 1} and str(resources.cloud) == "AWS"
    assert task.secrets["HF_TOKEN"].get_secret_value() == SECRET
    assert task.envs["SERVED_MODEL_NAME"] == "llm-atc/tiny"
    assert f"http://{sky.engine_url}/v1" in result.stdout and "openai" in result.stdout

    from llm_atc.registry import Registry

    (record,) = Registry().records()
    assert (record.status, record.cluster, record.cloud, record.accelerator) == ("RUNNING", "tiny-srv", "aws", "L4:1")
    assert record.endpoint == f"http://{sky.engine_url}" and record.checkpoint_uri == s3_checkpoint
    saved = Path(record.task_yaml).read_text()
    assert yaml.safe_load(saved)["secrets"] == {"HF_TOKEN": None, "VLLM_API_KEY": None}
    everything = saved + result.stdout + result.stderr + (llm_atc_home / "registry.db").read_bytes().decode("latin1")
    assert SECRET not in everything


def test_ctrl_c_while_waiting_leaves_the_cluster_up(cli, fake_sky):
    sky = fake_sky(interrupt=True)
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", "-c", "wait-srv", "-y")
    assert result.exit_code == 130, result
    assert "llm-atc status" in result.stderr and "llm-atc endpoint wait-srv" in result.stderr
    assert "llm-atc down wait-srv" in result.stderr
    assert sky.downs == [] and len(sky.launches) == 1


def test_engine_job_that_ends_is_reported_failed(cli, fake_sky, monkeypatch):
    from llm_atc.app import launch

    monkeypatch.setattr(launch, "_throttled", lambda check, every: check)
    sky = fake_sky(job_status="FAILED")
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", "-c", "dead-srv", "-y", "--timeout", "60")
    assert_one_line_error(result, "ended (FAILED)")
    assert "ValueError: not a model" in result.stderr and "engine line 10" not in result.stderr
    assert "\x1b[" not in result.stderr
    assert "Tore down dead-srv" in result.stderr and sky.downs == ["dead-srv"]
    from llm_atc.registry import Registry

    assert Registry().find("dead-srv").status == "FAILED"


def test_keep_on_failure_leaves_the_cluster_up(cli, fake_sky, monkeypatch):
    from llm_atc.app import launch

    monkeypatch.setattr(launch, "_throttled", lambda check, every: check)
    sky = fake_sky(job_status="FAILED")
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", "-c", "kept-srv", "-y", "--keep_on_failure")
    assert_one_line_error(result, "ended (FAILED)")
    assert sky.downs == [] and "llm-atc down kept-srv" in result.stderr


def test_no_confirmation_without_a_terminal_launches_nothing(cli, fake_sky):
    sky = fake_sky()
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", "-c", "ask-srv")
    assert result.exit_code == 4  # not confirmed
    assert "-y" in result.stderr and sky.launches == []


# --- infra without open ports or bucket mounting (e.g. Slurm), CPU serving --------------------------


def render(spec_options: dict, **render_options) -> dict:
    from llm_atc.app.serve import serve_spec
    from llm_atc.render import render_serve_task

    return render_serve_task(serve_spec(**spec_options), **render_options)


def test_infra_without_open_ports_gets_no_ports():
    """SkyPilot's feature table decides: Slurm cannot open ports, GCP can; the task stays valid."""
    from llm_atc.backends.skypilot import node_features
    from llm_atc.spec import parse_placement

    slurm = node_features(parse_placement(cloud="slurm", region=None, zone=None, accelerator=None))
    gcp = node_features(parse_placement(cloud="gcp", region=None, zone=None, accelerator=None))
    assert slurm.open_ports is False and gcp.open_ports is True
    config = render(
        dict(name="Qwen/Qwen2.5-0.5B-Instruct", engine="transformers", cloud="slurm", cpus="2", memory="4+", port=8123),
        features=slurm,
    )
    task = sky_task(config)
    (resources,) = task.resources
    assert resources.ports is None and "ports" not in config["resources"]
    assert resources.accelerators is None  # CPU serving asks for no GPU
    assert (config["resources"]["cpus"], config["resources"]["memory"]) == ("2", "4+")
    assert task.envs["PORT"] == "8123"


def test_bucket_is_fetched_by_the_recipe_where_skypilot_cannot_mount_it(s3_checkpoint):
    """No bucket mounting (or a custom endpoint in --envs): MODEL_SOURCE plus the bucket helper."""
    from llm_atc.render import NODE_HOME_MODEL_DIR, NodeFeatures

    no_fuse = NodeFeatures(open_ports=False, storage_mounting=False)
    for features, envs in ((no_fuse, ()), (NodeFeatures(), ("AWS_ENDPOINT_URL=http://127.0.0.1:9",))):
        config = render(
            dict(name="llm-atc/tiny", source=s3_checkpoint, engine="transformers", cloud="aws", envs=envs),
            features=features,
        )
        task = sky_task(config)
        assert task.envs["MODEL_SOURCE"] == s3_checkpoint
        assert task.envs["MODEL_NAME"] == NODE_HOME_MODEL_DIR
        helper = config["file_mounts"]["~/.llm-atc/buckets.py"]
        assert Path(helper).is_file() and set(config["file_mounts"]) == {"~/.llm-atc/buckets.py"}
    mounted = render(dict(name="llm-atc/tiny", source=s3_checkpoint, cloud="aws"))
    assert mounted["file_mounts"] == {
        "/llm-atc/model": {"source": s3_checkpoint, "mode": "COPY"},
        "~/.llm-atc/llm_atc_vllm_auth.py": str(recipes_dir() / "serve" / "llm_atc_vllm_auth.py"),
    }
    assert "MODEL_SOURCE" not in mounted["envs"] or not mounted["envs"]["MODEL_SOURCE"]


def test_local_folder_is_synced_under_the_node_home(tiny_model):
    """A folder on this machine goes to ~/llm-atc/model (per cluster on Slurm); an absolute name
    is served under the folder's own name, which is what clients then send."""
    config = render(dict(name=str(tiny_model), engine="transformers", cloud="slurm"))
    task = sky_task(config)
    assert config["file_mounts"] == {"~/llm-atc/model": str(tiny_model)}
    assert task.envs["MODEL_NAME"] == "~/llm-atc/model"
    assert task.envs["SERVED_MODEL_NAME"] == tiny_model.name


def test_serve_recipes_resolve_node_paths_and_fetch(tmp_path, s3_checkpoint):
    """The recipes' own shell: `~/` is the node's home, MODEL_SOURCE is fetched with buckets.py,
    and a folder is loaded through a link spelt like the served name (run here in bash)."""
    from llm_atc.recipes_catalog import get_recipe, recipes_dir

    node_home = tmp_path / "node-home"
    (node_home / ".llm-atc").mkdir(parents=True)
    (node_home / ".llm-atc" / "buckets.py").write_text((recipes_dir() / "train" / "buckets.py").read_text())
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "transformers").write_text('#!/bin/sh\necho "cwd=$(pwd) args=$*"\nls "$2"\n')
    (fake_bin / "transformers").chmod(0o755)
    recipe = get_recipe("serve/transformers").load()
    run = recipe["run"]
    env = {key: str(value) for key, value in recipe["envs"].items() if value is not None}  # the recipe's defaults
    env.update(
        os.environ,
        HOME=str(node_home),
        PATH=f"{fake_bin}:{os.environ['PATH']}",
        MODEL_NAME="~/llm-atc/model",
        MODEL_SOURCE=s3_checkpoint,
        SERVED_MODEL_NAME="llm-atc/tiny",
        HOST="0.0.0.0",
        PORT="8000",
        DEVICE="cpu",
        DTYPE="auto",
    )
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    done = subprocess.run(["bash", "-c", run], env=env, cwd=workdir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{s3_checkpoint} -> {node_home}/llm-atc/model" in done.stdout
    assert f"cwd={workdir}/served args=serve llm-atc/tiny --host 0.0.0.0 --port 8000" in done.stdout
    assert "config.json" in done.stdout and (node_home / "llm-atc" / "model" / "model.safetensors").is_file()
    again = subprocess.run(["bash", "-c", run], env=env, cwd=workdir, capture_output=True, text=True, timeout=120)
    assert "(0 files fetched)" in again.stdout  # incremental: nothing changed


def test_train_on_cpus_asks_for_no_gpu(tmp_path, tiny_model, cli, s3):
    """--cpus without --accelerator trains on CPUs; the base folder is synced under the node home."""
    s3.create_bucket(Bucket="cpu-train")
    data = tmp_path / "chats.json"
    data.write_text(
        json.dumps(
            [{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
        )
    )
    common = [
        "train",
        "--model_type",
        "lora",
        "--finetune_data",
        str(data),
        "--checkpoint_bucket",
        "cpu-train",
        "--checkpoint_store",
        "S3",
        "--base_model",
        str(tiny_model),
        "--cloud",
        "slurm",
        "--dryrun",
    ]
    refused = cli(*common)
    assert_one_line_error(refused, "--accelerator is required", "--cpus")
    assert refused.exit_code == 2
    result = cli(*common, "--cpus", "1")
    assert result.exit_code == 0, result
    config = yaml.safe_load(result.stdout)
    (resources,) = sky_task(config).resources
    assert resources.accelerators is None and config["resources"]["cpus"] == "1"
    assert config["file_mounts"] == {"~/llm-atc/base": str(tiny_model)}
    assert config["envs"]["MODEL_BASE"] == "~/llm-atc/base"


def test_forward_options_are_checked(cli):
    """--local_port needs --forward; a local deployment needs no tunnel."""
    from llm_atc.errors import UserError
    from llm_atc.registry import Record
    from llm_atc.tunnel import forward

    result = cli("endpoint", "some-cluster", "--local_port", "9000")
    assert result.exit_code == 2 and "--local_port goes with --forward" in result.stderr
    local = Record(
        name="m",
        kind="serve",
        model="m",
        cluster="c",
        status="RUNNING",
        cloud="local",
        endpoint="http://127.0.0.1:8000",
    )
    with pytest.raises(UserError, match="runs on this machine already"):
        with forward(local):
            pass


def test_stop_where_skypilot_cannot_stop_changes_nothing(cli, sky_boundary):
    """Slurm clusters cannot be stopped: one line suggesting `down`, before anything is asked or changed."""
    from llm_atc.registry import Record, Registry

    sky = sky_boundary()
    sky.clusters["on-slurm"] = "UP"
    registry = Registry()
    registry.add(Record(name="m", kind="serve", model="m", cluster="on-slurm", status="RUNNING", cloud="slurm"))
    result = cli("stop", "on-slurm")
    assert_one_line_error(result, "cannot be stopped", "llm-atc down on-slurm")
    assert registry.find("on-slurm").status == "RUNNING" and sky.stops == []


# --- auth on by default ------------------------------------------------------------------------------


def test_cloud_endpoint_gets_an_api_key_kept_only_in_credentials(cli, fake_sky, llm_atc_home):
    """A key per deployment: handed to vLLM as a SkyPilot secret, printed only by --show_key, stored
    0600, and nowhere else (registry, YAML, output). That vLLM on a node accepts the key llm-atc made is
    shown on Slurm (tests/test_slurm.py); here the "VM's" engine is the session's, whose key is VLLM_KEY."""
    sky = fake_sky()
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", "-c", "auth-srv", "-y", "--detach_run")
    assert result.exit_code == 0, result
    ((task, _),) = sky.launches
    key = task.secrets["VLLM_API_KEY"].get_secret_value()
    assert key.startswith("llm-atc-") and len(key) > 40
    from llm_atc import credentials

    assert credentials.clusters() == ["auth-srv"] and credentials.get("auth-srv") == key
    assert (llm_atc_home / "credentials.db").stat().st_mode & 0o777 == 0o600
    shown = cli("endpoint", "auth-srv", "--show_key")
    assert (shown.exit_code, shown.stdout.strip()) == (0, key)
    refused = cli("endpoint", "auth-srv", "--check")  # the engine there wants another key
    assert_one_line_error(refused, "refuses the API key", "401", "--show_key")
    from llm_atc.registry import Registry

    (record,) = Registry().records()
    everything = (
        Path(record.task_yaml).read_text()
        + result.stdout
        + result.stderr
        + refused.stdout
        + refused.stderr
        + (llm_atc_home / "registry.db").read_bytes().decode("latin1")
    )
    assert key not in everything
    assert cli("serve", "--name", "Qwen/Qwen2.5-7B", "--dryrun").stdout.count("VLLM_API_KEY: null") == 1

    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", "-c", "given-srv", "-y", *KEY)  # a key of the user's own
    assert result.exit_code == 0, result
    assert "$LLM_ATC_API_KEY" in result.stdout and "llm-atc endpoint given-srv --show_key" in result.stdout
    checked = cli("endpoint", "given-srv", "--check")  # our key is taken, and the model answers a request
    assert checked.exit_code == 0 and "ad" in checked.stdout.split(), checked  # vLLM's own model list
    assert "  Qwen/Qwen2.5-7B  generates (1 token)" in checked.stdout
    assert VLLM_KEY not in result.stdout + result.stderr + checked.stdout
    assert cli("down", "auth-srv", "-y").exit_code == 0
    assert credentials.clusters() == ["given-srv"]


def test_no_auth_and_transformers_serve_without_a_key(cli, fake_sky, llm_atc_home):
    sky = fake_sky()
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", "-c", "open-srv", "-y", "--no_auth", "--detach_run")
    assert result.exit_code == 0, result
    ((task, _),) = sky.launches
    assert task.secrets.get("VLLM_API_KEY") is None or task.secrets["VLLM_API_KEY"].get_secret_value() == ""
    from llm_atc import credentials

    assert "LLM_ATC_API_KEY" not in result.stdout and credentials.clusters() == []
    missing = cli("endpoint", "open-srv", "--show_key")
    assert_one_line_error(missing, "has no API key")
    spec_config, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", "--engine", "transformers", "--cloud", "gcp")
    assert "VLLM_API_KEY" not in (spec_config.get("secrets") or {})


def test_a_401_while_waiting_is_explained(cli, fake_sky, monkeypatch):
    """An engine that refuses our key (e.g. started with another one) fails the wait in one line."""
    fake_sky()
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", "-c", "other-srv", "-y", "--timeout", "30")
    assert_one_line_error(result, "refuses our API key (401)")


# --- SkyServe: replicas and autoscaling ----------------------------------------------------------------


def test_replicas_run_a_skyserve_service(cli, fake_sky, llm_atc_home):
    """--replicas MIN..MAX --target_qps with spot fallback: a service section SkyPilot parses,
    sky.serve.up, readiness through the load balancer with the key, status/logs/stop/down."""
    import types

    sky = fake_sky()
    sky.serve = FakeServe(sky)
    # A replica's handle as SkyPilot reports it for a VM on AWS (its launched resources price themselves).
    resources = types.SimpleNamespace(cloud="AWS", region="us-east-1", get_cost=lambda seconds: 0.2712 * seconds / 3600)
    sky.replica_handle = types.SimpleNamespace(launched_resources=resources)
    args = [
        "--name",
        "Qwen/Qwen2.5-7B",
        "--accelerator",
        "L4:1",
        "--cloud",
        "aws",
        "-c",
        "svc",
        "--replicas",
        "0..3",
        "--target_qps",
        "2.5",
        "--use_spot",
        "--ondemand_fallback",
        "1",
        "--dynamic_ondemand_fallback",
    ]
    config, _ = dryrun(cli, *args)
    task = sky_task(config)
    assert config["service"]["replica_policy"] == {
        "min_replicas": 0,
        "max_replicas": 3,
        "target_qps_per_replica": 2.5,
        "base_ondemand_fallback_replicas": 1,
        "dynamic_ondemand_fallback": True,
    }
    assert task.service.readiness_path == "/health" and task.service.min_replicas == 0
    assert task.service.max_replicas == 3 and task.service.target_qps_per_replica == 2.5
    assert "Bearer" not in json.dumps(config)  # the key stays out of the service spec

    result = cli("serve", *args, "-y", *KEY)
    assert result.exit_code == 0, result
    ((task, name),) = sky.serve.ups
    assert name == "svc" and task.secrets["VLLM_API_KEY"].get_secret_value() == VLLM_KEY
    assert f"http://{sky.engine_url}/v1" in result.stdout
    status = cli("status")
    assert "READY, 1/1 replicas ready" in status.stdout, status
    detail = cli("status", "svc")
    replica_row = next(line for line in detail.stdout.splitlines() if line.strip().startswith("1 "))
    assert "READY" in replica_row and "AWS/us-east-1" in replica_row and "0.27" in replica_row, detail.stdout
    assert "replica 1 of svc" in cli("logs", "svc").stdout
    assert_one_line_error(cli("stop", "svc", "-y"), "service cannot be stopped")
    assert cli("down", "svc", "-y").exit_code == 0 and sky.serve.downs == ["svc"]
    assert not sky.launches and not sky.downs  # no plain cluster was launched or torn down


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--replicas", "two"], "give N or MIN..MAX"),
        (["--replicas", "3..1"], "MIN must not exceed MAX"),
        (["--replicas", "0"], "at least one replica"),
        (["--replicas", "1..4"], "give --target_qps"),
        (["--replicas", "2", "--target_qps", "3"], "--target_qps needs a range"),
        (["--replicas", "1..4", "--target_qps", "0"], "positive number"),
        (["--target_qps", "3"], "--target_qps goes with --replicas"),
        (["--replicas", "2", "--ondemand_fallback", "1"], "go with --use_spot"),
        (["--replicas", "2", "--use_spot", "--ondemand_fallback", "3"], "between 0 and the most replicas (2)"),
        (["--replicas", "2", "--cloud", "local"], "does not apply to --cloud local"),
        (["--replicas", "2", "--cloud", "slurm", "--engine", "transformers"], "needs open ports"),
    ],
)
def test_bad_replica_options_are_one_line(cli, args, fragment):
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", *args, "--dryrun")
    assert_one_line_error(result, fragment)


def test_chat_template_reaches_the_node_as_a_file_byte_for_byte(cli, tmp_path, llm_atc_home):
    """--chat_template FILE|TEXT: checked, copied next to the saved task and synced to the node, where
    vLLM's --chat-template reads it (tests/test_vllm.py shows vLLM rendering with it)."""
    template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\\n$(id) `x` \"q\"{% endfor %}"
    source = tmp_path / "template.jinja"
    source.write_text(template)
    config, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", "--chat_template", str(source))
    sky_task(config)
    copy = Path(config["file_mounts"]["~/llm-atc/chat-template.jinja"])
    assert copy.read_bytes() == source.read_bytes() and copy.parent == llm_atc_home / "tasks"
    assert flag(command_of(config), "--chat-template") == "$HOME/llm-atc/chat-template.jinja"
    assert template not in yaml.safe_dump(config)  # a file, not an environment variable of any size

    inline = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", "--chat_template", "{{ messages[0]['content'] }}")[0]
    assert Path(inline["file_mounts"]["~/llm-atc/chat-template.jinja"]).read_text() == "{{ messages[0]['content'] }}"
    for args, fragment in (
        (["--chat_template", "nope.jinja"], "no such file"),
        (
            ["--chat_template", str(source), "--engine", "transformers", "--cloud", "gcp"],
            "--chat_template applies to --engine vllm",
        ),
    ):
        assert_one_line_error(cli("serve", "--name", "Qwen/Qwen2.5-7B", *args, "--dryrun"), fragment)


def test_lora_adapters_are_served_on_the_base_model(cli, s3, tmp_path, tiny_model):
    """--lora NAME=REF (repeatable): bucket adapters COPY-mounted, folders synced, Hub ids passed on;
    one --max-lora-rank that fits them all."""
    s3.create_bucket(Bucket="loras")
    adapter = {"base_model_name_or_path": "Qwen/Qwen2.5-7B", "r": 32, "peft_type": "LORA"}
    s3.put_object(Bucket="loras", Key="llm-atc/sql/adapter_config.json", Body=json.dumps(adapter).encode())
    folder = tmp_path / "chat-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({**adapter, "r": 8}))
    config, result = dryrun(
        cli,
        "--name",
        "Qwen/Qwen2.5-7B",
        "--cloud",
        "aws",
        "--lora",
        "sql=s3://loras/llm-atc/sql",
        "--lora",
        f"chat={folder}",
        "--lora",
        "hub=someone/qwen-lora",
        "--max_loras",
        "2",
    )
    task = sky_task(config)
    assert task.envs["MODEL_NAME"] == "Qwen/Qwen2.5-7B"
    assert command_of(config)[-9:] == [
        "--enable-lora",
        "--lora-modules",
        "sql=/llm-atc/lora/0",
        "chat=$HOME/llm-atc/lora/1",
        "hub=someone/qwen-lora",
        "--max-lora-rank",
        "64",
        "--max-loras",
        "3",
    ]
    assert config["file_mounts"] == {
        "~/.llm-atc/llm_atc_vllm_auth.py": str(recipes_dir() / "serve" / "llm_atc_vllm_auth.py"),
        "/llm-atc/lora/0": {"source": "s3://loras/llm-atc/sql", "mode": "COPY"},
        "~/llm-atc/lora/1": str(folder),
    }

    s3.put_object(Bucket="loras", Key="llm-atc/full/config.json", Body=b"{}")
    for args, fragment in (
        (["--lora", "sql"], "give NAME=REF"),
        (["--lora", "a b=x/y"], "not a valid adapter name"),
        (["--lora", "x=s3://loras/llm-atc/sql", "--lora", "x=s3://loras/llm-atc/sql"], "given twice"),
        (["--lora", "x=s3://loras/llm-atc/full"], "holds a full model, not a LoRA adapter"),
        (["--lora", f"x={tiny_model}"], "holds no adapter_config.json"),
        (["--lora", "x=s3://loras/llm-atc/sql", "--engine", "transformers"], "--lora applies to --engine vllm"),
    ):
        assert_one_line_error(cli("serve", "--name", "Qwen/Qwen2.5-7B", *args, "--dryrun"), fragment)
    from llm_atc.errors import UserError
    from llm_atc.render import NodeFeatures

    with pytest.raises(UserError, match="need SkyPilot's bucket mounting"):
        render(
            dict(name="Qwen/Qwen2.5-7B", cloud="slurm", lora=["x=s3://loras/llm-atc/sql"]),
            features=NodeFeatures(open_ports=False, storage_mounting=False),
        )


def test_num_nodes_spans_one_vllm_over_a_ray_cluster(cli, tmp_path):
    """--num_nodes 2: the task asks for two nodes; on the head the recipe starts Ray, waits for every
    node and runs the rendered command (pipeline parallel across nodes); a worker joins the head's Ray
    and stays. Ray itself is the multi-node GPU boundary: it is stood in for by a recording script."""
    config, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-72B", "--accelerator", "H100:8", "--num_nodes", "2")
    assert sky_task(config).num_nodes == 2
    command = command_of(config)
    assert flag(command, "--tensor-parallel-size") == "8" and flag(command, "--pipeline-parallel-size") == "2"
    assert flag(command, "--distributed-executor-backend") == "ray"
    bin_dir, fake_ray = tmp_path / "bin", tmp_path / "pylib" / "ray"
    bin_dir.mkdir()
    fake_ray.mkdir(parents=True)
    calls = tmp_path / "calls"
    (bin_dir / "ray").write_text(f'#!/bin/bash\necho ray "$@" >> {calls}\n')
    (bin_dir / "ray").chmod(0o755)
    (fake_ray / "__init__.py").write_text(
        "def init(address):\n    pass\n\ndef nodes():\n    return [{'Alive': True}, {'Alive': True}]\n"
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(fake_ray.parent),
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NUM_GPUS_PER_NODE": "8",
        "SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2",
        "LLM_ATC_VLLM_ENV": str(tmp_path / "no-engine-here"),
    }
    env.update({k: str(v) for k, v in config["envs"].items()})
    head = subprocess.run(
        ["bash", "-c", config["run"]],
        env={**env, "SKYPILOT_NODE_RANK": "0"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # The head got as far as starting the engine (which is not installed in this folder).
    assert f"llm-atc: starting {shlex.join(command)}" in head.stdout
    subprocess.run(
        ["bash", "-c", config["run"]], env={**env, "SKYPILOT_NODE_RANK": "1"}, cwd=tmp_path, check=True, timeout=30
    )
    head_ray, worker_ray = calls.read_text().splitlines()
    assert head_ray == "ray start --head --port 6379 --disable-usage-stats"
    assert worker_ray == "ray start --address 10.0.0.1:6379 --block"
    for args in (
        ["--num_nodes", "0"],
        ["--num_nodes", "2", "--engine", "transformers", "--cloud", "gcp"],
        ["--num_nodes", "2", "--replicas", "2"],
    ):
        assert_one_line_error(cli("serve", "--name", "Qwen/Qwen2.5-72B", *args, "--dryrun"), "--num_nodes")


def test_cache_weights_stages_a_hub_model_through_a_bucket(cli, s3, tiny_model, tmp_path, monkeypatch):
    """--cache_weights: the first replica downloads from the Hub and uploads to the bucket (marker
    last); the next one copies from the bucket with the Hub offline. buckets.py runs here against moto;
    only the Hub download (unreachable) is stood in for by a copy of the tiny model."""
    import importlib.util
    import shutil

    from llm_atc.recipes_catalog import recipes_dir

    s3.create_bucket(Bucket="weights")
    config, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", "--cache_weights", "s3://weights/cache")
    task = sky_task(config)
    assert task.envs["WEIGHTS_CACHE"] == "s3://weights/cache" and "~/.llm-atc/buckets.py" in config["file_mounts"]
    assert 'buckets.py" stage "$MODEL_NAME" "$WEIGHTS_CACHE"' in config["run"]
    # The node decides: the cache's copy streamed once it is complete, else staged to disk.
    assert flag(command_of(config), "--model") == "$MODEL_NAME"
    assert flag(command_of(config), "--load-format") == "$LOAD_FORMAT" and task.envs["WEIGHTS_STREAM"] == "1"
    assert flag(command_of(config), "--served-model-name") == "Qwen/Qwen2.5-7B"

    spec = importlib.util.spec_from_file_location("node_buckets", recipes_dir() / "train" / "buckets.py")
    buckets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(buckets)
    downloads = []

    def hub_download(repo_id, local_dir, token=None):
        downloads.append(repo_id)
        shutil.copytree(tiny_model, local_dir, dirs_exist_ok=True)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_download)
    with pytest.raises(SystemExit) as streamable:
        buckets.streamable("Qwen/Qwen2.5-7B", "s3://weights/cache")
    assert streamable.value.code == 1  # not cached yet
    buckets.stage("Qwen/Qwen2.5-7B", "s3://weights/cache", str(tmp_path / "first"))
    with pytest.raises(SystemExit) as streamable:
        buckets.streamable("Qwen/Qwen2.5-7B", "s3://weights/cache")
    assert streamable.value.code == 0
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="weights")["Contents"]]
    assert "cache/Qwen/Qwen2.5-7B/.llm-atc-staged" in keys and "cache/Qwen/Qwen2.5-7B/model.safetensors" in keys
    buckets.stage("Qwen/Qwen2.5-7B", "s3://weights/cache", str(tmp_path / "second"))
    assert downloads == ["Qwen/Qwen2.5-7B"]  # the second replica did not touch the Hub
    assert (tmp_path / "second" / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert not (tmp_path / "second" / ".llm-atc-staged").exists()

    for args, fragment in (
        (["--cache_weights", "weights/cache"], "--cache_weights"),
        (["--cache_weights", "s3://no-such-bucket/x"], "does not exist"),
    ):
        assert_one_line_error(cli("serve", "--name", "Qwen/Qwen2.5-7B", *args, "--dryrun"), fragment)
    assert_one_line_error(
        cli("serve", "--name", str(tiny_model), "--cache_weights", "s3://weights/c", "--dryrun"),
        "stages a Hugging Face model",
    )


def test_eos_token_goes_to_the_node_which_writes_the_generation_config(cli):
    """--eos_token: the node resolves the token with the model's own tokenizer and vLLM gets the
    generation config written from it (tests/test_vllm.py shows vLLM stopping at it)."""
    config, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", "--eos_token", "<pad>")
    assert sky_task(config).envs["EOS_TOKEN"] == "<pad>"
    assert flag(command_of(config), "--generation-config") == "$LLM_ATC_DIR/generation"
    for args, fragment in (
        (["--eos_token", "two words"], "give one token"),
        (
            ["--eos_token", "<pad>", "--engine", "transformers", "--cloud", "gcp"],
            "--eos_token applies to --engine vllm",
        ),
    ):
        assert_one_line_error(cli("serve", "--name", "Qwen/Qwen2.5-7B", *args, "--dryrun"), fragment)


def test_training_run_status_follows_the_job_then_the_published_model(fake_sky, s3_checkpoint, monkeypatch):
    """A detached cloud run: SUCCEEDED/FAILED once SkyPilot says its job ended; once the cluster is gone
    (autodown), a model published at its checkpoint URI means SUCCEEDED, nothing there leaves it RUNNING."""
    from llm_atc.api import TrainingRun
    from llm_atc.registry import Record, Registry

    registry = Registry()

    def run(job_status, checkpoint_uri=s3_checkpoint, cluster="UP"):
        sky = fake_sky(job_status=job_status)
        if cluster:
            sky.clusters["train-c"] = cluster
        record = registry.add(
            Record(
                name="r",
                kind="train",
                model="m",
                cluster="train-c",
                status="RUNNING",
                cloud="aws",
                checkpoint_uri=checkpoint_uri,
                details={"job_id": 3},
            )
        )
        return TrainingRun(record, registry)

    assert run("SUCCEEDED").status() == "SUCCEEDED"
    assert run("FAILED").status() == "FAILED"
    nothing = "s3://" + s3_checkpoint.split("/")[2] + "/llm-atc/nothing"
    assert run("RUNNING", nothing).status() == "RUNNING"
    gone = run("RUNNING", cluster=None)  # autodown took the cluster: the published model tells
    assert gone.status() == "SUCCEEDED" and registry.find("train-c", kind="train").status == "SUCCEEDED"
    assert run("RUNNING", nothing, cluster=None).status() == "FAILED"  # gone, and nothing published


def test_serving_a_detached_run_asks_how_it_ended(cli, fake_sky, s3_checkpoint):
    """`serve --name llm-atc/<run>` of a run recorded RUNNING (detached, never looked at since): SkyPilot is
    asked first; its job SUCCEEDED, so the run's model is served; a FAILED job is refused in one line."""
    from llm_atc.registry import Record, Registry

    registry = Registry()
    for run, job in (("finished", "SUCCEEDED"), ("crashed", "FAILED")):
        sky = fake_sky(job_status=job)
        sky.clusters[f"train-{run}"] = "UP"
        registry.add(Record(name=run, kind="train", model="m", cluster=f"train-{run}", status="RUNNING", cloud="aws",
                            checkpoint_uri=s3_checkpoint, details={"job_id": 3}))  # fmt: skip
        result = cli("serve", "--name", f"llm-atc/{run}", "--cloud", "aws", "--accelerator", "L4:1", "--dryrun")
        if job == "SUCCEEDED":
            assert result.exit_code == 0, result
            assert sky_task(yaml.safe_load(result.stdout)).envs["SERVED_MODEL_NAME"] == "llm-atc/finished"
        else:
            assert_one_line_error(result, "llm-atc/crashed", "the training run is FAILED")
        assert registry.find(run, kind="train").status == job


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--vllm_args", "--port 9000"], ["--vllm_args --port", "llm-atc's --port"]),
        (["--vllm_args", "--port=9000"], ["--vllm_args --port", "llm-atc's --port"]),
        (["--vllm_args", "--host 0.0.0.0"], ["--vllm_args --host", "endpoint NAME --forward"]),
        (["--vllm_args", "--api-key abc"], ["--vllm_args --api-key", "--secret VLLM_API_KEY"]),
        (["--vllm_args", "--api_key abc"], ["--vllm_args --api_key", "--secret VLLM_API_KEY"]),
        (["--vllm_args", "--served-model-name other"], ["--served-model-name", "llm-atc's --name"]),
        (["--vllm_args", "-tp 4"], ["-tp", "llm-atc's --accelerator"]),
        (["--vllm_args", "--tensor-parallel 4"], ["--tensor-parallel", "llm-atc's --accelerator"]),  # a prefix of it
        (["--vllm_args", "--pipeline-parallel-size 2"], ["--pipeline-parallel-size", "--num_nodes"]),
        (["--vllm_args", "--model other/model"], ["--vllm_args --model", "llm-atc's --name"]),
        (["--vllm_args", "--lora-modules a=b"], ["--lora-modules", "--lora NAME=REF"]),
        (["--vllm_args", "--hf-token hf_x"], ["--hf-token", "--secret HF_TOKEN"]),
        (["--vllm_args", "--config extra.yaml"], ["--config", "pass the flags themselves"]),
        (["--vllm_args", "--enable-prefx-caching"], ["no such flag", "did you mean --enable-prefix-caching?"]),
        (["--vllm_args", "--max-num-seqs"], ["--max-num-seqs needs a value"]),
        (["--vllm_args", "--po 1"], ["--po is ambiguous"]),
        (["--vllm_args", "some/model"], ["'some/model' is not a flag"]),
    ],
)
def test_vllm_args_that_llm_atc_owns_or_vllm_lacks_are_refused(cli, fake_sky, args, fragments):
    """Caught before anything launches or is recorded, with the llm-atc option (or the close flag) to use."""
    sky = fake_sky()
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", "--cloud", "gcp", "-y", *args)
    assert_one_line_error(result, *fragments)
    assert result.exit_code == 2 and sky.launches == []
    from llm_atc.registry import Registry

    assert Registry().records() == []


def test_accelerator_none_is_a_cpu_vllm_deployment_anywhere(cli):
    """--accelerator none (or --cpus alone) asks for no GPU: the node installs vLLM's CPU build and
    serves with one tensor-parallel rank."""
    for args in (["--accelerator", "none", "--cpus", "8+"], ["--cpus", "8+"]):
        config, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-0.5B-Instruct", "--cloud", "aws", *args)
        (resources,) = sky_task(config).resources
        assert resources.accelerators is None and config["resources"]["cpus"] == "8+"
        assert flag(command_of(config), "--tensor-parallel-size") == "1"
    slurm, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-0.5B-Instruct", "--cloud", "slurm", "--accelerator", "none")
    assert "accelerators" not in slurm["resources"] and "ports" not in slurm["resources"]
    gpus, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", "--cloud", "aws", "--accelerator", "A100:1,L4:2")
    assert flag(command_of(gpus), "--tensor-parallel-size") == "$GPUS_PER_NODE"  # decided on the node
