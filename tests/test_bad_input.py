"""Nothing paid for on bad input: every class of bad option, several vectors each. Each gives a non-zero
exit, one `Error:` line naming the option (and the file), no traceback, and nothing launched, uploaded or
recorded. The SkyPilot boundary is the recording FakeSky; buckets are moto's and the GCS emulator's."""

from __future__ import annotations

import json
import os

import pytest
from support.cli import assert_one_line_error
from support.training import sharegpt, train_args

MODEL = "Qwen/Qwen2.5-7B"


@pytest.fixture
def nothing_happens(sky_boundary, llm_atc_home):
    """The boundary, and a check that nothing was launched or recorded."""
    sky = sky_boundary()

    def check():
        from llm_atc.registry import Registry

        assert sky.launches == [] and sky.jobs.launches == []
        assert not (llm_atc_home / "registry.db").exists() or Registry().records() == []

    yield check
    check()


def refused(cli, *args, fragments, code=None):
    result = cli(*args)
    assert_one_line_error(result, *fragments)
    if code is not None:
        assert result.exit_code == code, result
    return result


@pytest.fixture
def files(tmp_path):
    """Bad files of every kind: a folder, a FIFO, non-UTF-8 bytes, something too big, a system file."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    binary = tmp_path / "binary.jinja"
    binary.write_bytes(b"\xff\xfe{{ messages }}")
    big = tmp_path / "big.jinja"
    big.write_text("{{ messages }}" + " " * (300 * 1024))
    return {"folder": folder, "fifo": fifo, "binary": binary, "big": big}


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("folder", "is a folder, not a file"),
        ("fifo", "is not a regular file"),
        ("binary", "is not UTF-8 text"),
        ("big", "at most 256 KiB"),
        ("/etc/passwd", "never uses `messages`"),
        ("/no/such/template.jinja", "no such file"),
        ("{% for m in messages %}{{ m.content }", "not a Jinja template"),
    ],
)
def test_chat_template_files_are_checked(cli, nothing_happens, files, kind, fragment):
    value = str(files.get(kind, kind))
    refused(
        cli,
        "serve",
        "--name",
        MODEL,
        "--cloud",
        "gcp",
        "--chat_template",
        value,
        "-y",
        fragments=["--chat_template", fragment],
    )


def test_a_large_but_allowed_chat_template_is_a_file_on_the_node(cli, tmp_path):
    """200 KB is fine: it travels as a file, never as an environment variable ("Argument list too long")."""
    template = tmp_path / "long.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}" + "{# pad #}" * 22000)
    result = cli("serve", "--name", MODEL, "--cloud", "gcp", "--chat_template", str(template), "--dryrun")
    assert result.exit_code == 0, result
    assert len(result.stdout) < 20000 and "chat-template.jinja" in result.stdout


@pytest.mark.parametrize(
    "base, fragment",
    [
        ("/etc", "holds no config.json"),
        ("~", "holds no config.json"),
        ("/no/such/folder", "no such folder"),
        ("not a model id!", "not a Hugging Face model id"),
    ],
)
def test_train_base_model_must_be_a_model(cli, nothing_happens, tmp_path, base, fragment):
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(sharegpt()))
    for cloud in ("local", "gcp"):
        refused(
            cli,
            "train",
            "--model_type",
            "lora",
            "--finetune_data",
            str(data),
            "--base_model",
            base,
            "--cloud",
            cloud,
            "--accelerator",
            "L4:1",
            "-y",
            fragments=["--base_model", fragment],
        )


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--timeout", "nan"], ["--timeout", "between"]),
        (["--timeout", "inf"], ["--timeout", "between"]),
        (["--timeout", "-1"], ["--timeout", "between"]),
        (["--timeout", "0"], ["--timeout", "between"]),
        (["--replicas", "1..3", "--target_qps", "nan"], ["--target_qps", "positive"]),
        (["--replicas", "1..3", "--target_qps", "inf"], ["--target_qps", "positive"]),
        (["--accelerator", "A100:1000"], ["--accelerator", "at most"]),
        (["--disk_size", "1000000000"], ["--disk_size", "between"]),
        (["--max_model_len", "100000000000"], ["--max_model_len", "between"]),
        (["--num_nodes", "100000"], ["--num_nodes", "between"]),
        (["--replicas", "100000"], ["--replicas", "between"]),
        (["--quantization", "bogus"], ["--quantization", "'bogus'", "choose one of"]),
        (["--cpus", "0"], ["--cpus"]),
        (["--memory", "1e9"], ["--memory"]),
        (["--max_loras", "-1"], ["--max_loras", "between"]),
        (["--max_loras", "100000"], ["--max_loras", "between"]),
        (["--max_lora_rank", "7"], ["--max_lora_rank 7", "vLLM accepts"]),
        (["--max_loras", "0", "--max_lora_rank", "16"], ["--max_lora_rank", "--max_loras 0"]),
        (["--engine", "transformers", "--max_loras", "2"], ["runtime LoRA needs vLLM"]),
        (["--num_nodes", "2", "--max_loras", "2"], ["runtime LoRA needs vLLM on one node"]),
        (["--weights", "stream"], ["--weights stream", "bucket"]),
        (["--weights", "bogus"], ["--weights", "'bogus'"]),
    ],
)
def test_numbers_are_finite_and_in_range(cli, nothing_happens, args, fragments):
    refused(cli, "serve", "--name", MODEL, "--cloud", "gcp", *args, "-y", fragments=fragments, code=2)


def test_train_numbers_are_in_range_too(cli, nothing_happens, tmp_path):
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(sharegpt()))
    base = ["train", "--model_type", "lora", "--finetune_data", str(data), "--cloud", "gcp", "-y"]
    refused(cli, *base, "--accelerator", "H100:1000", fragments=["--accelerator", "at most"])
    refused(cli, *base, "--accelerator", "H100:8", "--num_nodes", "5000", fragments=["--num_nodes", "between"])
    refused(cli, *base, "--accelerator", "H100:8", "--disk_size", "0", fragments=["--disk_size"])


def test_user_text_in_errors_is_shortened(cli, nothing_happens):
    long_name = "x" * 100_000
    for args in (
        ["serve", "--name", long_name, "--cloud", "gcp"],
        ["serve", "--name", "./" + long_name],
        ["endpoint", long_name],
        ["serve", "--name", MODEL, "--lora", f"a={long_name}"],
    ):
        result = cli(*args)
        assert_one_line_error(result)
        assert max(len(line) for line in result.stderr.splitlines()) < 400, args


def test_lora_errors_name_lora(cli, nothing_happens, tmp_path):
    refused(cli, "serve", "--name", MODEL, "--lora", "a=./no-such-adapter", fragments=["--lora", "no such folder"])
    refused(cli, "serve", "--name", MODEL, "--lora", "a=llm-atc/no-such-run", fragments=["--lora", "no-such-run"])
    refused(cli, "serve", "--name", MODEL, "--lora", "a=not a ref", fragments=["--lora", "not a Hugging Face"])


def test_bucket_errors_are_one_line_with_one_meaning_per_exit_code(cli, s3, gcs, tmp_path, nothing_happens):
    refused(
        cli,
        "list",
        "--remote",
        "--checkpoint_bucket",
        "no-such-bucket",
        "--checkpoint_store",
        "S3",
        fragments=["no-such-bucket", "does not exist"],
        code=3,
    )
    refused(
        cli,
        "list",
        "--remote",
        "--checkpoint_bucket",
        "no-such-bucket",
        "--checkpoint_store",
        "GCS",
        fragments=["no-such-bucket", "does not exist"],
        code=3,
    )
    s3.create_bucket(Bucket="has-data")
    gcs.create_bucket("has-data")
    for scheme in ("s3", "gs"):
        refused(
            cli,
            "train",
            "--model_type",
            "lora",
            "--finetune_data",
            f"{scheme}://has-data/missing.json",
            "--checkpoint_bucket",
            "has-data",
            "--checkpoint_store",
            "S3" if scheme == "s3" else "GCS",
            "--accelerator",
            "L4:1",
            "--cloud",
            "aws",
            "-y",
            fragments=["--finetune_data", "missing.json"],
            code=3,
        )


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--name", MODEL], ["--name", "given twice"]),
        (["--name", "Qwen/Qwen2.5-0.5B", "--lora", "x=Qwen/adapter"], ["--lora", "several --name"]),
        (["--name", "Qwen/Qwen2.5-0.5B", "--engine", "transformers"], ["several --name need vLLM"]),
        (["--name", "Qwen/Qwen2.5-0.5B", "--chat_template", "{{ messages }}"], ["--chat_template", "one model"]),
        (["--name", "Qwen/Qwen2.5-0.5B", "--replicas", "2"], ["--replicas", "one model"]),
        (["--name", "Qwen/Qwen2.5-0.5B", "--max_loras", "2"], ["--max_loras", "one model"]),
        (["--name", "Qwen/Qwen2.5-0.5B", "--source", "s3://my-bucket/llm-atc/x"], ["--source", "one model"]),
        (
            ["--name", "Qwen/Qwen2.5-0.5B", "--vllm_args", "--gpu-memory-utilization 0.5"],
            ["--gpu-memory-utilization", "each engine"],
        ),
        (["--name", "Qwen/Qwen2.5-0.5B", "--accelerator", "A100:1,H100:2"], ["--accelerator", "one count"]),
        ([arg for i in range(8) for arg in ("--name", f"org/m{i}")], ["--name is given 9 times", "at most 8"]),
    ],
)
def test_several_models_refuse_what_cannot_apply(cli, nothing_happens, extra, fragments):
    refused(cli, "serve", "--name", MODEL, *extra, "--cloud", "gcp", "-y", fragments=fragments)


def test_an_adapter_among_several_models_is_refused(cli, nothing_happens, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "Qwen/Qwen2.5-7B", "r": 8}')
    refused(
        cli, "serve", "--name", MODEL, "--name", str(adapter), "--cloud", "gcp", "-y", fragments=["is a LoRA adapter"]
    )


# --- preflight of local training -------------------------------------------------------------------------


def test_a_local_run_checks_its_packages_before_it_starts(cli, tiny_model, tmp_path, monkeypatch, llm_atc_home):
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(sharegpt()))
    args = train_args(data, tiny_model, "pre")
    refused(cli, *args, "--envs", "WANDB_API_KEY=wandb-key", fragments=["WANDB_API_KEY", "pip install wandb"])
    import sys

    monkeypatch.setitem(sys.modules, "trl", None)  # the [train] extra is not installed
    refused(cli, *args, fragments=["llm-atc[train]"])
    assert not (llm_atc_home / "local").exists()  # nothing started, no log written


# --- adapters ----------------------------------------------------------------------------------------------


def test_what_cannot_be_served_is_refused_before_an_engine_starts(cli, lora_run, session_home, monkeypatch):
    monkeypatch.setenv("LLM_ATC_HOME", str(session_home))
    from llm_atc.registry import Record, Registry

    registry = Registry()
    before = len(registry.records())
    refused(
        cli,
        "serve",
        "--name",
        f"llm-atc/{lora_run}",
        "--cloud",
        "local",
        "--engine",
        "transformers",
        fragments=["LoRA adapter", "--engine vllm"],
    )
    registry.add(
        Record(
            name="broken-run",
            kind="train",
            model="m",
            cluster="b",
            status="FAILED",
            checkpoint_uri=str(session_home / "checkpoints" / "broken-run"),
        )
    )
    refused(
        cli,
        "serve",
        "--name",
        "llm-atc/broken-run",
        "--cloud",
        "local",
        fragments=["llm-atc/broken-run", "FAILED", "no model to serve"],
    )
    assert len(registry.records()) == before + 1


# --- endpoints safe by default --------------------------------------------------------------------------


def test_an_endpoint_without_a_key_is_private_unless_asked(cli):
    for args in (["--engine", "transformers"], ["--no_auth"]):
        result = cli("serve", "--name", MODEL, "--cloud", "gcp", *args, "--dryrun")
        assert result.exit_code == 0, result
        assert "ports:" not in result.stdout and "private" in result.stderr and "--forward" in result.stderr
        opened = cli("serve", "--name", MODEL, "--cloud", "gcp", *args, "--open_port", "--dryrun")
        assert opened.exit_code == 0 and "ports: 8000" in opened.stdout, opened
        assert "anyone who can reach" in opened.stderr
    keyed = cli("serve", "--name", MODEL, "--cloud", "gcp", "--dryrun")
    assert "ports: 8000" in keyed.stdout and "plain HTTP" in keyed.stderr and "--tls_cert" in keyed.stderr


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--tls_cert", "cert.pem"], ["--tls_cert and --tls_key go together"]),
        (["--tls_cert", "/no/cert.pem", "--tls_key", "/no/key.pem"], ["--tls_cert", "no such file"]),
        (["--tls_cert", "{cert}", "--tls_key", "{cert}"], ["--tls_key", "no private key"]),
        (["--tls_cert", "{key}", "--tls_key", "{key}"], ["--tls_cert", "no certificate"]),
        (["--tls_cert", "{cert}", "--tls_key", "{key}", "--engine", "transformers"], ["--tls_cert", "vllm"]),
    ],
)
def test_tls_files_are_checked(cli, nothing_happens, tls_files, args, fragments):
    args = [a.format(**{k: str(v) for k, v in tls_files.items()}) for a in args]
    refused(cli, "serve", "--name", MODEL, "--cloud", "gcp", *args, "-y", fragments=fragments)


def test_tls_on_a_cluster_is_vllms_own_and_skyserves(cli, tls_files):
    result = cli(
        "serve",
        "--name",
        MODEL,
        "--cloud",
        "gcp",
        "--tls_cert",
        str(tls_files["cert"]),
        "--tls_key",
        str(tls_files["key"]),
        "--dryrun",
    )
    assert result.exit_code == 0, result
    import shlex

    import yaml

    config = yaml.safe_load(result.stdout)
    command = shlex.split(config["envs"]["VLLM_COMMAND"])
    assert command[command.index("--ssl-certfile") + 1] == "$HOME/llm-atc/tls/cert.pem"
    assert command[command.index("--ssl-keyfile") + 1] == "$HOME/llm-atc/tls/key.pem"
    assert config["file_mounts"]["~/llm-atc/tls/cert.pem"] == str(tls_files["cert"])
    assert "plain HTTP" not in result.stderr
    service = cli(
        "serve",
        "--name",
        MODEL,
        "--cloud",
        "gcp",
        "--tls_cert",
        str(tls_files["cert"]),
        "--tls_key",
        str(tls_files["key"]),
        "--replicas",
        "2",
        "--dryrun",
    )
    spec = yaml.safe_load(service.stdout)["service"]
    assert spec["tls"] == {"certfile": str(tls_files["cert"]), "keyfile": str(tls_files["key"])}


# --- the original llm-atc's documented commands ------------------------------------------------------------


def test_the_original_train_command_works_as_documented(cli, gcs, sky_boundary, tmp_path, monkeypatch):
    """`llm-atc train --model_type vicuna --finetune_data ./vicuna_test.json --name myvicuna ... --cloud gcp
    --envs "MODEL_SIZE=7 WANDB_API_KEY=..." --accelerator A100-80GB:4`: the store follows the cloud, a
    per-user bucket is created on first use and remembered, and MODEL_SIZE picks the base."""
    sky = sky_boundary()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vicuna_test.json").write_text(json.dumps(sharegpt()))
    original = [
        "train",
        "--model_type",
        "vicuna",
        "--finetune_data",
        "./vicuna_test.json",
        "--name",
        "myvicuna",
        "--description",
        "vicuna on my data",
        "-c",
        "mycluster",
        "--cloud",
        "gcp",
        "--accelerator",
        "A100-80GB:4",
        "--envs",
        "MODEL_SIZE=7 WANDB_API_KEY=wandb-secret",
    ]
    dry = cli(*original, "--dryrun")
    assert dry.exit_code == 0, dry
    import yaml

    envs = yaml.safe_load(dry.stdout)["envs"]
    assert envs["MODEL_BASE"] == "meta-llama/Llama-2-7b-hf" and "MODEL_SIZE" not in envs
    bucket = envs["OUTPUT_URI"].removeprefix("gs://").split("/")[0]
    assert bucket.startswith("llm-atc-") and envs["OUTPUT_URI"] == f"gs://{bucket}/llm-atc/myvicuna"
    assert "default bucket" in dry.stderr and not gcs.bucket(bucket).exists()  # a dry run creates nothing

    launched = cli(*original, "-y", "--detach_run")
    assert launched.exit_code == 0, launched
    assert gcs.bucket(bucket).exists() and f"Created gs://{bucket}" in launched.stderr
    ((task, kwargs),) = sky.launches
    assert task.envs["MODEL_BASE"] == "meta-llama/Llama-2-7b-hf"
    again = cli(*[a if a != "myvicuna" else "myvicuna-2" for a in original], "--dryrun")
    assert f"gs://{bucket}/llm-atc/myvicuna-2" in again.stdout and "Created" not in again.stderr

    thirteen = cli(*original[:-1], "MODEL_SIZE=13", "--name", "v13", "--dryrun")
    assert "meta-llama/Llama-2-13b-hf" in thirteen.stdout, thirteen
    refused(
        cli, *original[:-1], "MODEL_SIZE=30", "--name", "v30", "--dryrun", fragments=["MODEL_SIZE=30", "--base_model"]
    )
    refused(
        cli,
        *original[:-1],
        "MODEL_SIZE=7",
        "--base_model",
        "mistralai/Mistral-7B-v0.1",
        "--name",
        "v7",
        "--dryrun",
        fragments=["MODEL_SIZE", "--base_model"],
    )


# --- what it costs, before the user says yes ---------------------------------------------------------------


def test_the_confirmation_shows_the_hourly_price(cli, catalog, nothing_happens):
    result = cli("serve", "--name", MODEL, "--accelerator", "L4:1", "--cloud", "gcp")  # no terminal: refused
    assert result.exit_code == 4  # not confirmed
    assert "$0.7" in result.stderr and "/hour" in result.stderr, result.stderr
