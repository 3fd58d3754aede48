"""LoRA adapters loaded into a running vLLM deployment, without a restart (vLLM's runtime LoRA API).

Real parts only: the session's vLLM deployment (CPU build, `llm-atc serve --cloud local`), adapters
trained by `llm-atc train`, the official openai client. Slurm: tests/test_slurm.py.
"""

from __future__ import annotations

import json
import shutil

import openai
import pytest
from support.cli import assert_one_line_error, unique, using_home
from support.net import free_port
from support.replicas import replica_follower, wait_for
from support.training import sharegpt, train_args

DEPLOYMENT = "vllm-session"


def models(live) -> set[str]:
    return {model.id for model in live.client().models.list().data}


def answers(live, model: str) -> str:
    reply = live.client().chat.completions.create(
        model=model, max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
    )
    return reply.choices[0].message.content or ""


def engine_pid(live) -> int:
    from llm_atc.registry import Registry

    with using_home(live.home):
        return Registry().find(DEPLOYMENT).pid


def test_an_adapter_is_added_and_removed_without_a_restart(cli, vllm_deployment, lora_run):
    live = vllm_deployment
    pid = engine_pid(live)
    with using_home(live.home):
        added = cli("adapters", "add", DEPLOYMENT, f"hot=llm-atc/{lora_run}")
        try:
            assert added.exit_code == 0, added
            assert added.stdout.strip() == "hot" and "answers on vllm-session" in added.stderr
            assert "hot" in models(live) and answers(live, "hot") is not None
            listed = cli("adapters", "list", DEPLOYMENT)
            assert listed.exit_code == 0, listed
            rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:] if line.strip()}
            assert set(rows) == {"ad", "hot"} and "--lora at start" in rows["ad"]
            assert lora_run in rows["hot"]  # where it came from
            assert "up to rank 64, 4 active at once" in listed.stderr
        finally:
            removed = cli("adapters", "remove", DEPLOYMENT, "hot")
        assert removed.exit_code == 0, removed
        assert "hot" not in models(live)
        with pytest.raises(openai.NotFoundError):
            answers(live, "hot")
        assert "hot" not in cli("adapters", "list", DEPLOYMENT).stdout
    assert engine_pid(live) == pid  # the same engine process all along


TINY_RUN = "MAX_STEPS=2 MAX_SEQ_LEN=64 BATCH_SIZE=2"


def test_train_serve_on_ends_with_the_adapter_live(cli, vllm_deployment, tiny_model, tmp_path):
    live = vllm_deployment
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(sharegpt()))
    run = unique("served-on")
    with using_home(live.home):
        trained = cli(*train_args(data, tiny_model, run, "--serve_on", DEPLOYMENT, "--envs", TINY_RUN))
        try:
            assert trained.exit_code == 0, trained
            assert f"llm-atc/{run} answers on {DEPLOYMENT}" in trained.stdout
            assert f"llm-atc/{run}" in models(live) and answers(live, f"llm-atc/{run}") is not None
        finally:
            cli("adapters", "remove", DEPLOYMENT, f"llm-atc/{run}")


def test_the_python_api_trains_and_serves_on_alike(cli, vllm_deployment, tiny_model, tmp_path):
    """llm_atc.train(serve_on=...) ends as the CLI does: the adapter answers on the deployment when it returns."""
    import llm_atc

    live = vllm_deployment
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(sharegpt()))
    run = unique("api-served-on")
    with using_home(live.home):
        trained = llm_atc.train("lora", str(data), cloud="local", base_model=str(tiny_model), name=run,
                                serve_on=DEPLOYMENT, envs=[TINY_RUN])  # fmt: skip
        try:
            assert trained.status() == "SUCCEEDED"
            assert f"llm-atc/{run}" in models(live) and answers(live, f"llm-atc/{run}") is not None
        finally:
            cli("adapters", "remove", DEPLOYMENT, f"llm-atc/{run}")


def test_the_python_api(vllm_deployment, lora_run):
    import llm_atc

    live = vllm_deployment
    with using_home(live.home):
        deployment = llm_atc.get(DEPLOYMENT)
        deployment.add_adapter("api-hot", f"llm-atc/{lora_run}")
        try:
            assert "api-hot" in deployment.adapters() and answers(live, "api-hot") is not None
        finally:
            deployment.remove_adapter("api-hot")
        assert "api-hot" not in deployment.adapters()
        with pytest.raises(llm_atc.UserError, match="already serves ad"):
            deployment.add_adapter("ad", f"llm-atc/{lora_run}")


def adapter_folder(path, *, base: str, rank: int):
    """A peft adapter folder: the config vLLM and llm-atc read (the weights are never reached)."""
    path.mkdir()
    (path / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": base, "r": rank, "peft_type": "LORA", "target_modules": ["q_proj"]})
    )
    return path


def test_refusals_change_nothing(cli, vllm_deployment, lora_run, tiny_model, tmp_path):
    live = vllm_deployment
    before = models(live)
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model, other_base)
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(sharegpt()))
    with using_home(live.home):
        cases = [
            (("adapters", "add", "no-such-deployment", f"x=llm-atc/{lora_run}"), ("no deployment named",)),
            (("adapters", "add", DEPLOYMENT, f"ad=llm-atc/{lora_run}"), ("already serves ad",)),
            (("adapters", "add", DEPLOYMENT, "x"), ("give NAME=REF",)),
            (("adapters", "add", DEPLOYMENT, f"bad name!=llm-atc/{lora_run}"), ("not a valid adapter name",)),
            (
                (
                    "adapters",
                    "add",
                    DEPLOYMENT,
                    f"qwen={adapter_folder(tmp_path / 'qwen', base='Qwen/Qwen2.5-7B', rank=8)}",
                ),
                ("was trained on Qwen/Qwen2.5-7B", f"serves {tiny_model}"),
            ),
            (
                (
                    "adapters",
                    "add",
                    DEPLOYMENT,
                    f"big={adapter_folder(tmp_path / 'big', base=str(tiny_model), rank=128)}",
                ),
                ("rank 128", "maximum of 64", "--max_lora_rank 128"),
            ),
            (("adapters", "add", DEPLOYMENT, f"full={tiny_model}"), ("holds no adapter_config.json",)),
            (("adapters", "remove", DEPLOYMENT, "never-added"), ("serves no adapter 'never-added'", "adapters: ad")),
            (("adapters", "remove", DEPLOYMENT, str(tiny_model)), ("serves no adapter",)),
            (
                train_args(data, other_base, unique("wrong-base"), "--serve_on", DEPLOYMENT),
                (f"serves {tiny_model}", f"trains on {other_base}"),
            ),
            (
                train_args(data, tiny_model, unique("r"), "--serve_on", DEPLOYMENT, "--envs", "LORA_R=128"),
                ("rank 128",),
            ),
            (train_args(data, tiny_model, unique("r"), "--serve_on", DEPLOYMENT, "--envs", "MERGE=1"), ("MERGE=0",)),
            (train_args(data, tiny_model, unique("r"), "--serve_on", DEPLOYMENT, "--detach_run"), ("--detach_run",)),
            (train_args(data, tiny_model, unique("r"), "--serve_on", "no-such-deployment"), ("no deployment named",)),
        ]
        runs_before = cli("list").stdout
        for args, fragments in cases:
            assert_one_line_error(cli(*args), *fragments)
        vicuna = train_args(data, tiny_model, unique("v"), "--serve_on", DEPLOYMENT)
        vicuna[vicuna.index("lora")] = "vicuna"
        assert_one_line_error(cli(*vicuna), "--model_type lora or qlora")
        assert cli("list").stdout == runs_before  # no run was recorded, none trained
    assert models(live) == before  # the engine serves what it served


def test_deployments_without_runtime_lora_say_how_to_get_it(cli, vllm_engine, tiny_model, lora_run, session_home):
    """A vLLM deployment started with --max_loras 0, and a transformers one: refused in one line."""
    with using_home(session_home):
        plain, small = unique("no-lora"), unique("transformers")
        common = ("--name", str(tiny_model), "--cloud", "local", "--port", str(free_port()), "--max_model_len", "128")
        started = cli(
            "serve",
            *common,
            "--engine",
            "vllm",
            "-c",
            plain,
            "--max_loras",
            "0",
            "--vllm_args",
            "--enforce-eager",
            "--envs",
            "VLLM_CPU_KVCACHE_SPACE=1",
        )
        try:
            assert started.exit_code == 0, started
            assert_one_line_error(
                cli("adapters", "add", plain, f"x=llm-atc/{lora_run}"), "started without runtime LoRA", "--max_loras"
            )
        finally:
            cli("stop", plain)
        started = cli(
            "serve",
            "--name",
            str(tiny_model),
            "--cloud",
            "local",
            "--port",
            "0",
            "--engine",
            "transformers",
            "-c",
            small,
        )
        try:
            assert started.exit_code == 0, started
            assert_one_line_error(cli("adapters", "list", small), "runs transformers serve")
        finally:
            cli("stop", small)
        assert_one_line_error(cli("adapters", "list", plain), "STOPPED, not RUNNING")


# --- SkyServe services: a manifest in a bucket that every replica follows --------------------------------


def test_a_replica_loads_what_the_service_manifest_lists(vllm_deployment, lora_run, s3, moto_endpoint, tmp_path):
    """The node side: a replica's follower loads the adapters the manifest lists (fetched from the bucket, without
    the run's base), unloads those it drops, and one started later loads everything listed."""
    from support.buckets import upload_folder

    from llm_atc.recipes.train.buckets import adapter_folder

    live = vllm_deployment
    bucket = unique("svc")
    s3.create_bucket(Bucket=bucket)
    run = live.home / "checkpoints" / lora_run
    upload_folder(run, lambda name, path: s3.upload_file(str(path), bucket, f"runs/{lora_run}/{name}"))
    manifest = f"s3://{bucket}/llm-atc/services/svc/adapters.json"

    def publish(adapters: dict) -> None:
        body = json.dumps({"adapters": adapters}).encode()
        s3.put_object(Bucket=bucket, Key="llm-atc/services/svc/adapters.json", Body=body)

    replica = replica_follower(live, manifest, tmp_path, moto_endpoint)
    try:
        publish({"replica-ad": {"uri": f"s3://{bucket}/runs/{lora_run}"}})
        wait_for(lambda: "replica-ad" in models(live))
        assert answers(live, "replica-ad") is not None
        copy = tmp_path / "node-adapters" / adapter_folder("replica-ad", f"s3://{bucket}/runs/{lora_run}")
        assert (copy / "adapter_config.json").is_file() and not (copy / "base").exists()  # the adapter alone
        publish({})
        wait_for(lambda: "replica-ad" not in models(live))
        publish({"late-ad": {"uri": f"s3://{bucket}/runs/{lora_run}"}})
        replica.terminate()
        replica.wait(10)
        replica = replica_follower(live, manifest, tmp_path, moto_endpoint)  # a replica started later
        wait_for(lambda: "late-ad" in models(live))
        assert answers(live, "late-ad") is not None
    finally:
        replica.terminate()
        replica.wait(10)
        for name in ("replica-ad", "late-ad"):
            if name in models(live):
                live.client().post("/unload_lora_adapter", body={"lora_name": name}, cast_to=object)


def test_adapters_add_to_a_service_reaches_every_ready_replica(
    cli, fake_sky, vllm_deployment, lora_run, tiny_model, s3, moto_endpoint, tmp_path
):
    """`adapters add/list/remove SERVICE`: the adapter is uploaded next to the service's manifest in the user's
    default bucket, listed there, and the command returns once every ready replica serves it (SkyServe's replica
    here is the session's real vLLM server, with the follower each replica runs)."""
    from support.sky_boundary import FakeServe
    from support.vllm_setup import VLLM_KEY

    from llm_atc.registry import Registry

    live = vllm_deployment
    sky = fake_sky()
    sky.serve = FakeServe(sky)
    sky.replica_handle = None
    service = unique("svc")
    adapter = tmp_path / "adapter"
    shutil.copytree(live.home / "checkpoints" / lora_run, adapter, ignore=shutil.ignore_patterns("base"))
    (adapter / "adapter_config.json").write_text(
        json.dumps({**json.loads((adapter / "adapter_config.json").read_text()), "base_model_name_or_path": live.model})
    )
    with using_home(live.home):
        served = cli(
            "serve", "--name", live.model, "--accelerator", "L4:1", "--cloud", "aws", "-c", service,
            "--replicas", "2", "-y", "--secret", f"VLLM_API_KEY={VLLM_KEY}",
        )  # fmt: skip
        assert served.exit_code == 0, served
        record = Registry().find(service)
        manifest = record.details["adapters_manifest"]
        assert manifest.startswith("s3://llm-atc-") and manifest.endswith(f"/llm-atc/services/{service}/adapters.json")
        ((task, _),) = sky.serve.ups
        assert task.envs["ADAPTERS_MANIFEST"] == manifest  # what each replica follows
        replica = replica_follower(live, manifest, tmp_path, moto_endpoint)
        try:
            added = cli("adapters", "add", service, f"svc-ad={adapter}")
            assert added.exit_code == 0, added
            assert "loaded by 1 ready replica(s); replicas started later load it too" in added.stderr
            assert "svc-ad" in models(live) and answers(live, "svc-ad") is not None
            listed = cli("adapters", "list", service)
            assert "svc-ad" in listed.stdout and f"/llm-atc/services/{service}/adapters/svc-ad" in listed.stdout
            again = cli("adapters", "add", service, f"svc-ad={adapter}")
            assert_one_line_error(again, f"{service} already serves svc-ad")
            removed = cli("adapters", "remove", service, "svc-ad")
            assert removed.exit_code == 0, removed
            assert "svc-ad" not in models(live)
            assert_one_line_error(cli("adapters", "remove", service, "svc-ad"), "lists no adapter 'svc-ad'")
        finally:
            replica.terminate()
            replica.wait(10)
            cli("down", service, "-y")
