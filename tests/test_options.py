"""Unit tests of option parsing (options.py), model references (models.py) and serve specs (spec.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_atc import options
from llm_atc.app.resolve import resolve_model
from llm_atc.app.serve import serve_spec
from llm_atc.errors import NotFoundError, UserError
from llm_atc.models import ModelRef, check_run_name
from llm_atc.options import (
    Accelerator,
    check_cluster_name,
    check_port,
    cluster_name_for,
    is_secret_name,
    parse_accelerators,
    parse_env_pairs,
    parse_extra_args,
    split_envs_and_secrets,
)
from llm_atc.registry import Record, Registry, Status
from llm_atc.storage import BucketURI

KNOWN = ["A10", "A10G", "A100", "A100-80GB", "H100", "L4", "T4"]


def raises_one_line(call, *fragments: str, error: type[UserError] = UserError) -> UserError:
    """Run ``call``; it must raise ``error`` whose one-line message holds every fragment."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


@pytest.fixture(autouse=True)
def _in_empty_dir(tmp_path, monkeypatch):
    """Relative names never hit a folder of the checkout."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


# --- options.py ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("A100", (Accelerator("A100", 1),)),
        ("a100-80gb:2", (Accelerator("A100-80GB", 2),)),
        (" L4:1 , t4:4 ", (Accelerator("L4", 1), Accelerator("T4", 4))),
    ],
)
def test_parse_accelerators(value, expected):
    """NAME[:COUNT] lists are parsed and names take the catalog's spelling."""
    assert parse_accelerators(value, KNOWN) == expected


def test_parse_accelerators_without_catalog_keeps_names():
    """Without a known list (custom infra) any name is taken as given."""
    assert parse_accelerators("my-gpu:3") == (Accelerator("my-gpu", 3),)


def test_parse_accelerators_superscript_count():
    """A count that is a digit-like character but not a number is a UserError."""
    raises_one_line(lambda: parse_accelerators("A100:²", KNOWN), "whole number")


def test_secret_names():
    """Known credential names and credential suffixes are secrets; others are not."""
    for key in ("HF_TOKEN", "hf_token", "WANDB_API_KEY", "MY_TOKEN", "X_KEY", "X_SECRET", "DB_PASSWORD"):
        assert is_secret_name(key), key
    for key in ("MODEL_SIZE", "TOKENIZER", "KEYS", "SECRETARY", "PORT"):
        assert not is_secret_name(key), key


def test_parse_env_pairs(monkeypatch):
    """Several items per value, shell quoting, and bare keys read from the environment."""
    monkeypatch.setenv("FROM_ENV", "local value")
    parsed = parse_env_pairs(["A=1 B='two words'", "FROM_ENV", "C=x=y", "EMPTY="], option="--envs")
    assert parsed == {"A": "1", "B": "two words", "FROM_ENV": "local value", "C": "x=y", "EMPTY": ""}


def test_split_envs_and_secrets():
    """Credential-looking envs move to secrets; --secret values win on conflicts."""
    plain, secrets = split_envs_and_secrets({"A": "1", "HF_TOKEN": "e"}, {"HF_TOKEN": "s", "PLAIN": "p"})
    assert plain == {"A": "1"}
    assert secrets == {"HF_TOKEN": "s", "PLAIN": "p"}


def test_parse_extra_args():
    """Extra engine flags are split like a shell would (tests/test_serve_cloud.py checks them against vLLM's)."""
    assert parse_extra_args(None, option="--vllm_args") == ()
    assert parse_extra_args("--a 1 --b 'x y'", option="--vllm_args") == ("--a", "1", "--b", "x y")
    raises_one_line(lambda: parse_extra_args("--a 'x", option="--vllm_args"), "--vllm_args", "quotation")


@pytest.mark.parametrize(
    "model, expected",
    [
        ("lmsys/vicuna-13b-v1.3", "llm-atc-vicuna-13b-v1-3"),
        ("llm-atc/My_Run", "llm-atc-my-run"),
        ("/models/tiny/", "llm-atc-tiny"),
        ("org/___", "llm-atc-model"),
    ],
)
def test_cluster_name_for(model, expected):
    """Derived cluster names are valid slugs of the model's last path part."""
    assert cluster_name_for(model) == expected
    assert check_cluster_name(expected) == expected


def test_cluster_name_for_long_model_is_truncated_with_digest():
    """Long names are cut to the limit with a stable digest, and differ for different models."""
    a = cluster_name_for("org/" + "a" * 80)
    b = cluster_name_for("org2/" + "a" * 80)
    assert len(a) <= options.MAX_CLUSTER_NAME and check_cluster_name(a) == a
    assert a != b and a == cluster_name_for("org/" + "a" * 80)


@pytest.mark.parametrize("check", [check_cluster_name, check_run_name])
def test_names_with_trailing_newline(check):
    """A newline is never part of a cluster or run name."""
    raises_one_line(lambda: check("abc\n"), "'abc\\n'", "not a valid")


@pytest.mark.parametrize("port, ok", [(0, True), (8000, True), (65535, True), (-1, False), (65536, False)])
def test_check_port(port, ok):
    """Ports are 0-65535."""
    if ok:
        assert check_port(port) == port
    else:
        raises_one_line(lambda: check_port(port), f"--port {port}", "0-65535")


# --- models.py -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lmsys/vicuna-7b-v1.3", "gpt2", "meta-llama/Llama-2-7b-hf", "  org/m.v_1  "])
def test_resolve_hub_id(name):
    """Hub ids resolve to themselves."""
    ref = resolve_model(name)
    assert ref == ModelRef(name=name.strip(), hub_id=name.strip())
    assert ref.location == name.strip() and ref.run is None


def test_resolve_run_without_registry_entry():
    """An unknown llm-atc/<run> is a NotFoundError telling the user to pass --source."""
    raises_one_line(
        lambda: resolve_model("llm-atc/run-1"),
        "llm-atc/run-1",
        "--source",
        "s3://BUCKET/llm-atc/run-1",
        error=NotFoundError,
    )


def test_resolve_run_from_registry():
    """A trained run's checkpoint URI comes from the registry."""
    registry = Registry()
    registry.add(
        Record(
            name="run-1",
            kind="train",
            model="base",
            cluster="llm-atc-train-run-1",
            status=Status.SUCCEEDED,
            checkpoint_uri="gs://ckpts/llm-atc/run-1",
        )
    )
    ref = resolve_model("llm-atc/run-1")
    assert ref.name == "llm-atc/run-1" and ref.run == "run-1"
    assert ref.bucket == BucketURI("gs", "ckpts", "llm-atc/run-1")
    assert ref.hub_id is None and ref.path is None


def test_resolve_run_from_registry_local_checkpoint(tmp_path):
    """A run trained locally resolves to its checkpoint folder."""
    registry = Registry(tmp_path / "r.db")
    registry.add(
        Record(
            name="loc",
            kind="train",
            model="base",
            cluster="c",
            status=Status.SUCCEEDED,
            checkpoint_uri=str(tmp_path / "ckpt"),
        )
    )
    ref = resolve_model("llm-atc/loc", registry=registry)
    assert ref.path == tmp_path / "ckpt" and ref.bucket is None


def test_source_wins_over_registry():
    """--source is used even when the registry knows the run."""
    Registry().add(
        Record(
            name="run-1",
            kind="train",
            model="b",
            cluster="c",
            status=Status.SUCCEEDED,
            checkpoint_uri="gs://ckpts/llm-atc/run-1",
        )
    )
    ref = resolve_model("llm-atc/run-1", source="s3://other/llm-atc/run-1/")
    assert ref.bucket == BucketURI("s3", "other", "llm-atc/run-1")
    ref = resolve_model("my-org/my-model", source="s3://other/weights")
    assert ref.name == "my-org/my-model" and ref.bucket == BucketURI("s3", "other", "weights")


def test_resolve_local_folder(tmp_path):
    """A folder with config.json (or adapter_config.json) resolves to its absolute path."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert resolve_model(str(full)) == ModelRef(name=str(full), path=full.resolve())
    assert resolve_model(str(adapter)).path == adapter.resolve()
    relative = Path("rel")
    relative.mkdir()
    (relative / "config.json").write_text("{}")
    assert resolve_model("rel").path == relative.resolve()
    assert resolve_model("./rel").path == relative.resolve()


def test_resolve_folder_without_config(tmp_path):
    """A folder without a model config is a UserError; a missing path a NotFoundError."""
    (tmp_path / "empty").mkdir()
    raises_one_line(lambda: resolve_model(str(tmp_path / "empty")), "no config.json")
    raises_one_line(
        lambda: resolve_model("./does-not-exist"), "'./does-not-exist'", "no such folder", error=NotFoundError
    )


@pytest.mark.parametrize("name", ["x; touch /tmp/pwned", "$(id)", "a b", "`id`", "org/m && id", "a/b/c", "-rf"])
def test_resolve_rejects_injection(name):
    """Names that could be shell syntax are rejected, with and without --source."""
    raises_one_line(lambda: resolve_model(name), repr(name))
    raises_one_line(lambda: resolve_model(name, source="s3://bucket/x"), repr(name))


@pytest.mark.parametrize("name", ["llm-atc/x; id", "llm-atc/$(id)", "llm-atc/", "llm-atc/../etc"])
def test_resolve_rejects_bad_run_names(name):
    """llm-atc/<run> needs a valid run name."""
    raises_one_line(lambda: resolve_model(name), "not a valid run name")
    raises_one_line(lambda: resolve_model(name, source="s3://bucket/x"), "not a valid run name")


def test_resolve_empty_name_and_bad_source():
    """An empty --name and a non-bucket --source are one-line errors."""
    raises_one_line(lambda: resolve_model("   "), "--name is empty")
    raises_one_line(lambda: resolve_model("org/m", source="/local/path"), "--source", "s3://BUCKET/PATH")


def test_check_run_name():
    """Run names: 1-63 of letters, digits, '.', '_' and '-', starting with a letter or digit."""
    assert check_run_name("a" * 63) == "a" * 63
    raises_one_line(lambda: check_run_name("a" * 64), "not a valid run name")
    raises_one_line(lambda: check_run_name("_x", option="--run"), "--run '_x'")


# --- spec.py: serve_spec -------------------------------------------------------------

MODEL = "lmsys/vicuna-7b-v1.3"


def test_serve_spec_defaults():
    """A plain request gets A100:1, vLLM, port 8000 and a derived cluster name."""
    spec = serve_spec(MODEL)
    assert spec.model == ModelRef(name=MODEL, hub_id=MODEL)
    assert spec.placement.accelerators == (Accelerator("A100", 1),)
    assert spec.placement.cloud is None and spec.placement.infra is None
    assert (spec.engine, spec.port, spec.cluster) == ("vllm", 8000, "llm-atc-vicuna-7b-v1-3")
    assert spec.envs == {} and spec.secrets == {}


@pytest.mark.parametrize(
    "accelerator, fragments",
    [
        ("A100:0", ["'A100:0'", "at least 1"]),
        ("A100:x", ["'A100:x'", "'x'", "not a whole number"]),
        ("A100:-1", ["'A100:-1'", "not a whole number"]),
        (":2", ["':2'", "missing GPU name"]),
        ("A1000", ["unknown GPU 'A1000'", "did you mean", "A100"]),
        ("A100:1,a100:2", ["'A100:1,a100:2'", "same GPU twice"]),
        ("  ", ["--accelerator is empty"]),
    ],
)
def test_serve_spec_bad_accelerator(accelerator, fragments):
    """Bad --accelerator values are one-line UserErrors naming the problem."""
    raises_one_line(lambda: serve_spec(MODEL, accelerator=accelerator), *fragments)


@pytest.mark.parametrize("accelerator", [None, ""])
def test_serve_spec_vllm_defaults_to_one_a100(accelerator):
    """vLLM needs a GPU: without --accelerator a cluster serve asks for A100:1."""
    spec = serve_spec(MODEL, accelerator=accelerator, cloud="gcp")
    assert spec.engine == "vllm" and spec.placement.accelerators == (Accelerator("A100", 1),)


def test_serve_spec_transformers_asks_for_no_gpu_unless_given():
    """--engine transformers runs on CPUs: no accelerator unless one is given; --cpus/--memory pass through."""
    spec = serve_spec(MODEL, engine="transformers", cloud="slurm", region="localcluster", cpus="1", memory="8+")
    assert spec.placement.accelerators == ()
    assert (spec.placement.cpus, spec.placement.memory) == ("1", "8+")
    assert spec.placement.infra == "slurm/localcluster"
    assert spec.placement.resources_text == "cpus=1, memory=8+"
    with_gpu = serve_spec(MODEL, engine="transformers", cloud="gcp", accelerator="L4:1")
    assert with_gpu.placement.accelerators == (Accelerator("L4", 1),)


@pytest.mark.parametrize(
    "envs, fragments",
    [
        (["1BAD=x"], ["--envs", "'1BAD'", "not a valid variable name"]),
        (["A-B=x"], ["'A-B'", "not a valid variable name"]),
        (["LLM_ATC_TEST_UNSET"], ["--envs LLM_ATC_TEST_UNSET", "not set in your environment"]),
        (["A='unbalanced"], ["--envs", "No closing quotation"]),
        ([""], ["--envs needs KEY=VALUE"]),
    ],
)
def test_serve_spec_bad_envs(envs, fragments, monkeypatch):
    """Bad --envs items are one-line UserErrors."""
    monkeypatch.delenv("LLM_ATC_TEST_UNSET", raising=False)
    raises_one_line(lambda: serve_spec(MODEL, envs=envs), *fragments)


def test_serve_spec_bad_secret():
    """--secret is checked the same way and names its own option."""
    raises_one_line(lambda: serve_spec(MODEL, secrets=["9X=1"]), "--secret", "'9X'")


def test_serve_spec_splits_envs_and_secrets(monkeypatch):
    """Credential-named --envs become secrets; --secret is always a secret; values come from env."""
    monkeypatch.setenv("HF_TOKEN", "hf-from-env")
    spec = serve_spec(
        MODEL,
        envs=["MODEL_SIZE=7 WANDB_API_KEY=x", "HF_TOKEN", "X_TOKEN=t X_KEY=k X_SECRET=s", "PLAIN_B=2"],
        secrets=["PLAIN=not-a-secret-name"],
    )
    assert spec.envs == {"MODEL_SIZE": "7", "PLAIN_B": "2"}
    assert spec.secrets == {
        "WANDB_API_KEY": "x",
        "HF_TOKEN": "hf-from-env",
        "X_TOKEN": "t",
        "X_KEY": "k",
        "X_SECRET": "s",
        "PLAIN": "not-a-secret-name",
    }
    assert "hf-from-env" not in repr(spec)


def test_serve_spec_cloud_names():
    """A known cloud is normalised; an unknown one suggests close matches (imports SkyPilot)."""
    spec = serve_spec(MODEL, cloud="GCP", region="us-central1", zone="us-central1-a")
    assert spec.placement.infra == "gcp/us-central1/us-central1-a"
    raises_one_line(lambda: serve_spec(MODEL, cloud="gcpp"), "unknown cloud 'gcpp'", "did you mean", "gcp")


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(region="us-east-1"), ["--region needs --cloud"]),
        (dict(zone="us-east-1a"), ["--zone needs --region"]),
        (dict(cloud="aws", zone="us-east-1a"), ["--zone needs --region"]),
        (dict(port=0), ["--port 0", "--cloud local"]),
        (dict(port=70000), ["--port 70000", "0-65535"]),
        (dict(cloud="local", region="r"), ["--region and --zone do not apply to --cloud local"]),
        (dict(dtype="fp8"), ["--dtype 'fp8'", "bfloat16"]),
        (dict(max_model_len=0), ["--max_model_len 0", "between 1 and"]),
        (dict(engine="tgi"), ["--engine 'tgi'", "vllm"]),
        (dict(disk_size=0), ["--disk_size 0", "between 1 and"]),
        (dict(vllm_args="serve x"), ["--vllm_args", "'serve' is not a flag"]),
        (dict(cpus="four"), ["--cpus 'four'", "4+ (at least)"]),
        (dict(cpus="0"), ["--cpus '0'", "number of vCPUs between"]),
        (dict(cpus="4++"), ["--cpus '4++'"]),
        (dict(memory="-1"), ["--memory '-1'", "GB"]),
        (dict(cloud="local", cpus="2"), ["--cpus and --memory do not apply to --cloud local"]),
        (dict(cloud="local", keep_on_failure=True), ["--keep_on_failure", "clusters"]),
        (dict(cloud="slurmm"), ["'slurmm'", "slurm"]),
    ],
)
def test_serve_spec_bad_options(kwargs, fragments):
    """Placement and engine options are validated up front."""
    raises_one_line(lambda: serve_spec(MODEL, **kwargs), *fragments)


@pytest.mark.parametrize("cluster", ["Bad", "1abc", "abc-", "a_b", "a" * 64, "a b", "x;id"])
def test_serve_spec_bad_cluster_names(cluster):
    """--cluster must be a lowercase slug starting with a letter."""
    raises_one_line(lambda: serve_spec(MODEL, cluster=cluster), f"--cluster {cluster!r}", "not a valid cluster name")


def test_serve_spec_local_port_zero_and_cluster():
    """--cloud local accepts port 0 and skips the accelerator; a given cluster name is kept."""
    spec = serve_spec(MODEL, cloud="local", port=0, cluster="my-server-1")
    assert spec.is_local and spec.port == 0 and spec.placement.accelerators == ()
    assert spec.cluster == "my-server-1" and spec.engine == "auto"


def test_serve_spec_model_errors_come_through():
    """Model reference errors reach serve_spec's caller unchanged."""
    raises_one_line(lambda: serve_spec("llm-atc/unknown-run"), "--source", error=NotFoundError)
    raises_one_line(lambda: serve_spec("$(id)"), "'$(id)'")
