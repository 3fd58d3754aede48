"""`llm-atc train` and `llm-atc list`: checks before launch, rendered tasks, uploads, and a real local run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from support.cli import assert_one_line_error
from support.dryrun import sky_task


def sharegpt(n: int = 12) -> list[dict]:
    return [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "human", "value": f"What is {i} plus {i}?"},
                {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."},
                {"from": "human", "value": "Thanks!"},
                {"from": "gpt", "value": "You are welcome."},
            ],
        }
        for i in range(n)
    ]


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(sharegpt()))
    return path


ORIGINAL_TRAIN = [  # the original llm-atc's documented train commands (its README), a key filled in
    ["--model_type", "vicuna", "--name", "myvicuna", "--description", "This is a finetuned model that just says its "
     "name is vicuna", "-c", "mycluster", "--cloud", "gcp", "--envs", "MODEL_SIZE=7 WANDB_API_KEY=my-wandb-key",
     "--accelerator", "A100-80GB:4"],
    ["--model_type", "vicuna", "--checkpoint_bucket", "my-trainy-bucket", "--checkpoint_store", "S3", "--name",
     "myvicuna", "--cloud", "aws", "--envs", "MODEL_SIZE=7", "--accelerator", "A100-80GB:4"],
]  # fmt: skip


@pytest.mark.parametrize("args", ORIGINAL_TRAIN, ids=["gcp-default-bucket", "aws-s3-bucket"])
def test_the_original_train_commands_dry_run_without_credentials(cli, data_file, monkeypatch, args):
    """No cloud credentials at all (nor a way to find some): the task is shown, and what could not be checked
    is one line, not an error."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
                 "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no metadata servers asked for credentials either
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(data_file.parent / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(data_file.parent / "none"))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(data_file.parent / "no-gcloud"))
    result = cli("train", "--finetune_data", str(data_file), *args, "--dryrun")
    assert result.exit_code == 0, result
    task = sky_task(yaml.safe_load(result.stdout))
    assert task.name == "mycluster" if "-c" in args else task.name == "llm-atc-train-myvicuna"
    (resources,) = task.resources
    assert resources.accelerators == {"A100-80GB": 4}
    skipped = [line for line in result.stderr.splitlines() if "not checked in this dry run" in line]
    # no credentials here, or (with some left in this process by an earlier test) no connection to the store
    assert len(skipped) == 1 and re.search(
        r"(no credentials for|cannot reach the object store for) (gs|s3)://", skipped[0]
    )
    assert "my-wandb-key" not in result.stdout  # a key in --envs travels as a secret


def test_without_dryrun_missing_credentials_stop_the_launch(cli, data_file, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(data_file.parent / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(data_file.parent / "none"))
    result = cli("train", "--finetune_data", str(data_file), *ORIGINAL_TRAIN[1], "-y")
    assert_one_line_error(result, "s3://my-trainy-bucket")
    assert re.search(r"Error: (no credentials for|cannot reach the object store for) s3://", result.stderr)


@pytest.mark.parametrize("model_type, env_type", [("vicuna", "full"), ("lora", "lora"), ("qlora", "qlora")])
def test_dryrun_task_per_model_type(cli, s3, data_file, model_type, env_type):
    s3.create_bucket(Bucket="ckpts")
    result = cli(
        "train",
        "--model_type",
        model_type,
        "--finetune_data",
        str(data_file),
        "--checkpoint_bucket",
        "ckpts",
        "--checkpoint_store",
        "S3",
        "--name",
        "run1",
        "--accelerator",
        "A100-80GB:8",
        "--num_nodes",
        "2",
        "--cloud",
        "aws",
        "--envs",
        "WANDB_API_KEY=wandb-secret EPOCHS=1",
        "--dryrun",
    )
    assert result.exit_code == 0, result
    config = yaml.safe_load(result.stdout)
    task = sky_task(config)
    assert task.num_nodes == 2
    (resources,) = task.resources
    assert resources.accelerators == {"A100-80GB": 8} and str(resources.cloud) == "AWS"
    assert task.envs["MODEL_TYPE"] == env_type
    assert task.envs["OUTPUT_URI"] == "s3://ckpts/llm-atc/run1"
    assert task.envs["DATA"] == "s3://ckpts/llm-atc/run1/data/chats.json"
    assert task.envs["EPOCHS"] == "1"
    assert config["secrets"]["WANDB_API_KEY"] is None and "wandb-secret" not in result.stdout
    assert Path(config["workdir"], "finetune.py").is_file()
    assert "12 conversations" in result.stderr and "48 turns" in result.stderr
    assert list(s3.list_objects_v2(Bucket="ckpts").get("Contents", [])) == []  # dry run: nothing uploaded


def test_spot_run_is_a_managed_job_task(cli, gcs, data_file):
    bucket = gcs.create_bucket("spot-ckpts")
    result = cli(
        "train",
        "--model_type",
        "lora",
        "--finetune_data",
        str(data_file),
        "--checkpoint_bucket",
        bucket.name,
        "--checkpoint_store",
        "GCS",
        "--name",
        "spot1",
        "--accelerator",
        "L4:1",
        "--use_spot",
        "--dryrun",
    )
    assert result.exit_code == 0, result
    task = sky_task(yaml.safe_load(result.stdout))
    (resources,) = task.resources
    assert resources.use_spot and task.envs["OUTPUT_URI"] == f"gs://{bucket.name}/llm-atc/spot1"


def test_training_recipes_parse_with_their_envs():
    from llm_atc.recipes_catalog import all_recipes

    train = [r for r in all_recipes() if r.kind == "train"]
    assert {r.name for r in train} == {"vicuna", "lora", "qlora"}
    for recipe in train:
        from llm_atc.sky_sdk import import_sky

        task = import_sky().Task.from_yaml_config(
            recipe.load(), env_overrides=[("DATA", "s3://b/d.json"), ("OUTPUT_URI", "s3://b/llm-atc/r")]
        )
        assert task.setup == "bash setup.sh" and task.run == "bash run.sh"


BAD_DATA = [
    ("not json at all", "line 1: not JSON"),
    (json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}]), "record 0"),
    (json.dumps(sharegpt(3) + [{"id": "x", "conversations": [{"from": "robot", "value": "beep"}]}]), "record 3"),
]


@pytest.mark.parametrize("content, fragment", BAD_DATA)
def test_bad_data_is_reported_before_launch(cli, s3, tmp_path, content, fragment):
    s3.create_bucket(Bucket="bad-data")
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = cli(
        "train",
        "--model_type",
        "lora",
        "--finetune_data",
        str(path),
        "--checkpoint_bucket",
        "bad-data",
        "--checkpoint_store",
        "S3",
        "--name",
        "r",
        "--accelerator",
        "L4",
        "-y",
    )
    assert_one_line_error(result, "--finetune_data", fragment)
    assert "Contents" not in s3.list_objects_v2(Bucket="bad-data")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--checkpoint_store", "S3"], "--checkpoint_bucket is required"),
        (["--checkpoint_bucket", "b"], "--checkpoint_store is required"),
        (["--checkpoint_bucket", "b", "--checkpoint_store", "AZURE"], "choose one of S3, GCS"),
        (["--checkpoint_bucket", "b", "--checkpoint_store", "local"], "--cloud local"),
        (
            ["--checkpoint_bucket", "no-such-bucket", "--checkpoint_store", "S3", "--accelerator", "L4"],
            "no-such-bucket",
        ),
        (["--checkpoint_bucket", "bkt", "--checkpoint_store", "S3"], "--accelerator is required"),
        (
            ["--checkpoint_bucket", "bkt", "--checkpoint_store", "S3", "--accelerator", "L4", "--name", "a b"],
            "not a valid run name",
        ),
        (
            ["--checkpoint_bucket", "b", "--checkpoint_store", "S3", "--accelerator", "L4"],
            "--checkpoint_bucket 'b' is not a valid bucket name",
        ),
    ],
)
def test_missing_or_bad_options(cli, s3, data_file, args, fragment):
    result = cli("train", "--model_type", "lora", "--finetune_data", str(data_file), *args, "--dryrun")
    assert_one_line_error(result, fragment)


def test_missing_required_options_are_usage_errors(cli):
    result = cli("train", "--finetune_data", "x.json")
    assert result.exit_code == 2 and "--model_type" in result.stderr


def test_a_taken_name_is_refused(cli, s3, data_file):
    from llm_atc.registry import Record, Registry

    s3.create_bucket(Bucket="taken")
    Registry().add(
        Record(
            name="used",
            kind="train",
            model="m",
            cluster="c",
            status="SUCCEEDED",
            checkpoint_uri="s3://taken/llm-atc/used",
        )
    )
    result = cli(
        "train",
        "--model_type",
        "lora",
        "--finetune_data",
        str(data_file),
        "--checkpoint_bucket",
        "taken",
        "--checkpoint_store",
        "S3",
        "--name",
        "used",
        "--accelerator",
        "L4",
        "--dryrun",
    )
    assert_one_line_error(result, "'used' exists (SUCCEEDED)", "llm-atc down used")


def test_list_with_remote_marks_where_runs_are(cli, s3):
    from llm_atc.registry import Record, Registry

    s3.create_bucket(Bucket="listing")
    s3.put_object(Bucket="listing", Key="llm-atc/both/config.json", Body=b"{}")
    s3.put_object(Bucket="listing", Key="llm-atc/bucket-only/config.json", Body=b"{}")
    registry = Registry()
    for name in ("both", "registry-only"):
        registry.add(
            Record(
                name=name,
                kind="train",
                model="m",
                cluster="c",
                status="SUCCEEDED",
                checkpoint_uri=f"s3://listing/llm-atc/{name}",
                details={"model_type": "lora"},
            )
        )
    result = cli("list", "--remote", "--checkpoint_bucket", "listing", "--checkpoint_store", "S3")
    assert result.exit_code == 0, result
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    assert "registry + bucket" in lines["both"]
    assert "registry only" in lines["registry-only"]
    assert "bucket only" in lines["bucket-only"]
    filtered = cli("list", "--name", "registry", "--model_type", "lora", "--limit", "1")
    assert "registry-only" in filtered.stdout and "both" not in filtered.stdout


def test_local_data_is_uploaded_on_launch(cli, s3, data_file, sky_boundary):
    """Everything up to SkyPilot runs for real; the cloud launch itself is the recorded boundary."""
    sky = sky_boundary()
    s3.create_bucket(Bucket="upload")
    result = cli(
        "train",
        "--model_type",
        "lora",
        "--finetune_data",
        str(data_file),
        "--checkpoint_bucket",
        "upload",
        "--checkpoint_store",
        "S3",
        "--name",
        "up1",
        "--accelerator",
        "L4:1",
        "--detach_run",
        "-y",
    )
    assert result.exit_code == 0, result
    body = s3.get_object(Bucket="upload", Key="llm-atc/up1/data/chats.json")["Body"].read()
    assert json.loads(body) == json.loads(data_file.read_text())
    ((task, kwargs),) = sky.launches
    assert kwargs == {"cluster_name": "llm-atc-train-up1", "no_setup": False, "down": True}
    assert task.envs["DATA"] == "s3://upload/llm-atc/up1/data/chats.json"
    from llm_atc.registry import Registry

    record = Registry().find("up1", kind="train")
    assert (record.status, record.checkpoint_uri, record.details["job_id"]) == ("RUNNING", "s3://upload/llm-atc/up1", 1)


def test_train_locally_then_serve_the_run(cli, tiny_model, data_file, llm_atc_home):
    """The whole local path: a real LoRA run on CPU, recorded, then served as llm-atc/<run>."""
    result = cli(
        "train",
        "--model_type",
        "lora",
        "--finetune_data",
        str(data_file),
        "--cloud",
        "local",
        "--base_model",
        str(tiny_model),
        "--name",
        "tiny-lora",
        "--envs",
        "MAX_STEPS=3 MAX_SEQ_LEN=128 BATCH_SIZE=2 GRAD_ACCUM=1",
    )
    assert result.exit_code == 0, result
    output = llm_atc_home / "checkpoints" / "tiny-lora"
    assert (output / "config.json").is_file()
    from llm_atc.registry import Registry

    record = Registry().find("tiny-lora", kind="train")
    assert record.status == "SUCCEEDED" and record.checkpoint_uri == str(output)
    assert "training finished" in (llm_atc_home / "local" / "llm-atc-train-tiny-lora" / "train.log").read_text()
    assert "training finished" in cli("logs", "tiny-lora").stdout
    listed = cli("list")
    assert "tiny-lora" in listed.stdout and "SUCCEEDED" in listed.stdout

    served = cli(
        "serve",
        "--name",
        "llm-atc/tiny-lora",
        "--cloud",
        "local",
        "--port",
        "0",  # vLLM, being installed
        "--envs",
        "VLLM_CPU_KVCACHE_SPACE=1",
    )
    try:
        assert served.exit_code == 0, served
        from openai import OpenAI

        base_url = cli("endpoint", "llm-atc/tiny-lora").stdout.strip()
        reply = OpenAI(base_url=base_url, api_key="x").chat.completions.create(
            model="llm-atc/tiny-lora", messages=[{"role": "user", "content": "What is 2 plus 2?"}], max_tokens=5
        )
        assert reply.choices[0].message.content is not None
        from llm_atc.registry import Registry

        assert Registry().find("llm-atc/tiny-lora", kind="serve").engine == "vllm"  # --engine auto
    finally:
        cli("stop", "llm-atc/tiny-lora")


def test_gcs_upload_and_remote_listing(cli, gcs, data_file, sky_boundary):
    """The same upload and --remote listing against the GCS emulator; --use_spot is a managed job."""
    sky = sky_boundary()
    bucket = gcs.create_bucket("gcs-runs")
    bucket.blob("llm-atc/elsewhere/config.json").upload_from_string("{}")
    result = cli(
        "train",
        "--model_type",
        "qlora",
        "--finetune_data",
        str(data_file),
        "--checkpoint_bucket",
        "gcs-runs",
        "--checkpoint_store",
        "GCS",
        "--name",
        "g1",
        "--accelerator",
        "L4:1",
        "--use_spot",
        "-y",
    )
    assert result.exit_code == 0, result
    assert json.loads(bucket.blob("llm-atc/g1/data/chats.json").download_as_bytes()) == sharegpt()
    ((task, name),) = sky.jobs.launches
    assert name == "g1" and sky.launches == []
    (resources,) = task.resources
    assert resources.use_spot and task.envs["MODEL_TYPE"] == "qlora"
    from llm_atc.registry import Registry

    record = Registry().find("g1", kind="train")
    assert record.details["job_id"] == 11 and record.mode == "managed"

    result = cli("list", "--remote", "--checkpoint_bucket", "gcs-runs", "--checkpoint_store", "GCS")
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    assert "bucket only" in lines["elsewhere"]
    assert "registry + bucket" in lines["g1"]  # its data is there already


def test_python_api_trains_lists_and_serves(tiny_model, data_file):
    """llm_atc.train() → TrainingRun → run.serve() → a chat → stopped; llm_atc.list()/get() see both."""
    from openai import OpenAI

    import llm_atc

    run = llm_atc.train(
        "lora",
        str(data_file),
        cloud="local",
        base_model=str(tiny_model),
        name="api-lora",
        envs=["MAX_STEPS=2 MAX_SEQ_LEN=64 BATCH_SIZE=2 GRAD_ACCUM=1"],
    )
    assert isinstance(run, llm_atc.TrainingRun)
    assert run.status() == "SUCCEEDED" and (Path(run.checkpoint_uri) / "config.json").is_file()
    assert "training finished" in run.logs()
    with run.serve(cloud="local", engine="transformers", port=0) as deployment:
        assert deployment.name == "llm-atc/api-lora" and deployment.status() == "RUNNING"
        reply = OpenAI(base_url=deployment.base_url, api_key="x").chat.completions.create(
            model=deployment.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.choices[0].message.role == "assistant"
    assert deployment.status() == "STOPPED"
    assert [type(item).__name__ for item in llm_atc.list()] == ["Deployment", "TrainingRun"]
    assert isinstance(llm_atc.get("api-lora"), llm_atc.TrainingRun)
    assert isinstance(llm_atc.get("llm-atc/api-lora"), llm_atc.Deployment)
    with pytest.raises(llm_atc.UserError, match="no deployment or training run named 'nope'"):
        llm_atc.get("nope")
