"""No endpoint bills forever (#23): a deployment ends by itself when nobody calls it (--idle_minutes) or when its
time is up (--max_hours), a cluster whose engine ended is torn down by SkyPilot's autodown, `status` says what each
costs so far, and defaults live in $LLM_ATC_HOME/config.yaml.

The watcher runs for real beside the real vLLM (CPU build) and transformers serve here; SkyPilot's autodown on the
local Slurm cluster is in test_slurm.py; a public cloud's launch is asserted on the arguments handed to SkyPilot.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time

import httpx
import pytest
from support.cli import assert_one_line_error, unique
from support.dryrun import dryrun, sky_task
from support.processes import group_of
from support.vllm_setup import VLLM_KEY

from llm_atc.registry import Registry, Status

GPU = ("--cloud", "gcp", "--accelerator", "L4:1")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--idle_minutes", "-1"], ["--idle_minutes -1", "between 0.5 and 10080"]),
        (["--idle_minutes", "nan"], ["--idle_minutes nan"]),
        (["--idle_minutes", "0.001"], ["--idle_minutes 0.001", "minutes"]),
        (["--max_hours", "0"], ["--max_hours 0", "between 0.01 and 8760"]),
        (["--max_hours", "100000"], ["--max_hours 100000"]),
        (["--price_per_hour", "-2"], ["--price_per_hour -2"]),
        (["--max_hours", "2", "--replicas", "2"], ["--max_hours ends one cluster"]),
        (["--idle_minutes", "5", "--replicas", "2"], ["scales it to zero", "--replicas 0..2"]),
        (["--idle_minutes", "5", "--engine", "transformers"], ["transformers serve has none"]),
        (["--idle_minutes", "5", "--keep_on_failure"], ["--keep_on_failure keeps a cluster"]),
    ],
)
def test_bad_limits_are_one_line(cli, llm_atc_home, args, fragments):
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", *GPU, *args, "-y")
    assert_one_line_error(result, *fragments)
    assert not (llm_atc_home / "registry.db").exists() or Registry().records() == []


def test_train_limits_are_checked_too(cli, tmp_path, llm_atc_home):
    data = tmp_path / "chats.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]))
    for args, fragment in ((["--max_hours", "-1"], "--max_hours -1"), (["--envs", "MAX_HOURS=3"], "--envs MAX_HOURS")):
        result = cli("train", "--model_type", "lora", "--finetune_data", str(data), "--cloud", "local", *args)
        assert_one_line_error(result, fragment)


def test_the_task_carries_the_watcher_and_the_service_scales_to_zero(cli):
    config, result = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", *GPU, "--idle_minutes", "30", "--max_hours", "8")
    sky_task(config)
    watch = shlex.split(config["envs"]["WATCH_ARGS"])
    assert watch == ["--idle-minutes", "30", "--max-hours", "8", "--metrics", "http://127.0.0.1:8000/metrics"]
    assert config["file_mounts"]["~/.llm-atc/llm_atc_watch.py"].endswith("recipes/serve/llm_atc_watch.py")
    assert 'llm_atc_watch.py" --pid $$ $WATCH_ARGS &' in config["run"]
    config, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", *GPU, "--idle_minutes", "10", "--replicas", "0..3",
                       "--target_qps", "1")  # fmt: skip
    sky_task(config)
    policy = config["service"]["replica_policy"]
    assert policy["min_replicas"] == 0 and policy["downscale_delay_seconds"] == 600
    assert not config["envs"].get("WATCH_ARGS")
    config, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", *GPU)
    assert not config["envs"].get("WATCH_ARGS") and "~/.llm-atc/llm_atc_watch.py" not in config.get("file_mounts", {})


def test_a_training_time_limit_reaches_the_node(cli, s3, tmp_path):
    s3.create_bucket(Bucket="limits")
    data = tmp_path / "chats.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]))
    bucket = ["--checkpoint_bucket", "limits", "--checkpoint_store", "S3"]
    result = cli("train", "--model_type", "lora", "--finetune_data", str(data), "--cloud", "aws", "--accelerator",
                 "L4:1", *bucket, "--max_hours", "2", "--dryrun")  # fmt: skip
    assert result.exit_code == 0, result
    assert "MAX_HOURS: '2'" in result.stdout or 'MAX_HOURS: "2"' in result.stdout


def test_a_cluster_goes_away_when_its_engine_ends_and_says_what_it_costs(cli, fake_sky, catalog, llm_atc_home):
    """SkyPilot gets down=True (its autodown: a crashed or idle engine stops billing); the confirmation and
    `status` give the catalog price, the time up and the cost so far."""
    from llm_atc.app.cost import cheapest_offer

    sky = fake_sky()
    asked = cli("serve", "--name", "Qwen/Qwen2.5-7B", *GPU, "-c", "cost-srv", "--idle_minutes", "30")
    assert asked.exit_code == 4  # no terminal, no -y: the question is asked, nothing launched
    assert "it ends after 30 idle minutes" in asked.stderr and "/hour" in asked.stderr
    key = ("--secret", f"VLLM_API_KEY={VLLM_KEY}")  # the session's engine, behind the fake cloud, has this key
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", *GPU, "-c", "cost-srv", "-y", "--idle_minutes", "30", *key)
    assert result.exit_code == 0, result
    ((_, kwargs),) = sky.launches
    assert kwargs["down"] is True
    price = cheapest_offer([("L4", 1)], "gcp", None, use_spot=False).price
    record = Registry().find("cost-srv")
    assert record.details["price"]["per_hour"] == pytest.approx(price)
    assert record.details["limits"] == {"idle_minutes": 30}
    Registry().update(record, created_at=time.time() - 2 * 3600)  # up for two hours
    shown = json.loads(cli("status", "--json").stdout)
    (row,) = [r for r in shown["rows"] if r["cluster"] == "cost-srv"]
    assert row["price_per_hour"] == pytest.approx(price) and 7190 <= row["up_seconds"] <= 7300
    assert row["cost_so_far"] == pytest.approx(2 * price, rel=0.01) and row["ends"] == "after 30 idle minutes"
    assert shown["cost_so_far"] == pytest.approx(row["cost_so_far"])
    table = cli("status").stdout
    assert f"${price:.2f}" in table and f"${2 * price:.2f}" in table and "Cost so far:" in table
    kept = cli("serve", "--name", "Qwen/Qwen2.5-7B", *GPU, "-c", "kept-srv", "-y", "--keep_on_failure", *key)
    assert kept.exit_code == 0, kept
    assert "down" not in sky.launches[-1][1]  # --keep_on_failure: the cluster stays when its engine ends


def test_own_hardware_and_a_given_price(cli, fake_sky):
    fake_sky()
    mine = cli("serve", "--name", "Qwen/Qwen2.5-7B", "--cloud", "slurm", "--region", "x", "--accelerator", "L4:1",
               "-c", "own-srv", "-y", "--detach_run")  # fmt: skip
    assert mine.exit_code == 0, mine
    given = cli("serve", "--name", "Qwen/Qwen2.5-7B", *GPU, "-c", "given-price", "-y", "--detach_run",
                "--price_per_hour", "1.5")  # fmt: skip
    assert given.exit_code == 0, given
    rows = {r["cluster"]: r for r in json.loads(cli("status", "--json").stdout)["rows"]}
    assert rows["own-srv"]["price_source"] == "own hardware" and rows["own-srv"]["cost_so_far"] is None
    assert rows["given-price"]["price_per_hour"] == 1.5 and rows["given-price"]["price_source"] == "--price_per_hour"


def test_idle_ends_a_deployment_of_two_models_and_traffic_to_either_keeps_both(
    cli, vllm_engine, tmp_path, monkeypatch, llm_atc_home
):
    """Real vLLMs behind the gateway, --idle_minutes 0.5: embedding requests to one model keep the whole deployment
    up; /health probes do not; once nothing comes, the watcher ends it: DOWN (idle 0.5 min), key forgotten,
    nothing left running."""
    from llm_atc import credentials
    from llm_atc.demo import build_tiny_encoder, build_tiny_model

    monkeypatch.setenv("LLM_ATC_WATCH_INTERVAL", "2")  # the watcher's sampling period, for a test's short idle time
    chat, embed = build_tiny_model(tmp_path / "idle-chat"), build_tiny_encoder(tmp_path / "idle-embed")
    cluster = unique("idle")
    result = cli("serve", "--name", str(chat), "--name", str(embed), "--cloud", "local",
                 "--port", "0", "-c", cluster, "--idle_minutes", "0.5", "--secret", "VLLM_API_KEY=idle-key",
                 "--envs", "VLLM_CPU_KVCACHE_SPACE=1", "--timeout", "900")  # fmt: skip
    record = Registry().find(cluster)
    try:
        assert result.exit_code == 0, result
        assert credentials.get(cluster) == "idle-key"
        headers = {"Authorization": "Bearer idle-key"}
        for _ in range(10):  # 50 s of traffic to the embedding model alone: longer than the idle time
            answer = httpx.post(record.endpoint + "/v1/embeddings", headers=headers, timeout=30,
                                json={"model": str(embed), "input": ["alpha"]})  # fmt: skip
            assert answer.status_code == 200
            time.sleep(5)
        assert Registry().find(cluster).status == Status.RUNNING and group_of(record.pid)
        deadline = time.monotonic() + 120
        while group_of(record.pid) and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):  # the gateway goes with the engines
                httpx.get(record.endpoint + "/health", timeout=5)  # not traffic
            time.sleep(2)
        assert group_of(record.pid) == []
        shown = json.loads(cli("status", cluster, "--json").stdout)["rows"][0]
        assert (shown["status"], shown["detail"]) == ("DOWN", "idle 0.5 min"), shown
        assert credentials.get(cluster) is None
        assert "DOWN (idle 0.5 min)" in cli("status").stdout  # shown without -a: it ended by itself
    finally:
        cli("stop", cluster)


def test_max_hours_ends_a_transformers_deployment(cli, tiny_model, monkeypatch, tmp_path):
    """--max_hours needs no metrics: transformers serve ends when its time is up (0.01 h = 36 s)."""
    monkeypatch.setenv("LLM_ATC_ENGINES", str(tmp_path / "no-engines"))  # transformers serve, quick to start
    monkeypatch.setenv("LLM_ATC_WATCH_INTERVAL", "2")
    cluster = unique("hours")
    result = cli("serve", "--name", str(tiny_model), "--cloud", "local", "--port", "0", "-c", cluster,
                 "--max_hours", "0.01")  # fmt: skip
    record = Registry().find(cluster)
    try:
        assert result.exit_code == 0, result
        deadline = time.monotonic() + 120
        while group_of(record.pid) and time.monotonic() < deadline:
            time.sleep(2)
        assert group_of(record.pid) == []
        shown = json.loads(cli("status", cluster, "--json").stdout)["rows"][0]
        assert (shown["status"], shown["detail"]) == ("DOWN", "0.01 hours up"), shown
    finally:
        cli("stop", cluster)


def test_defaults_come_from_the_config_file(cli, llm_atc_home):
    llm_atc_home.mkdir(parents=True, exist_ok=True)
    config = llm_atc_home / "config.yaml"
    config.write_text("serve:\n  cloud: gcp\n  accelerator: L4:1\n  idle_minutes: 20\n")
    rendered, result = dryrun(cli, "--name", "Qwen/Qwen2.5-7B")
    assert rendered["resources"]["infra"] == "gcp" and "--idle-minutes 20" in rendered["envs"]["WATCH_ARGS"]
    flag_wins, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B", "--idle_minutes", "45")
    assert "--idle-minutes 45" in flag_wins["envs"]["WATCH_ARGS"]
    for text, fragment in (
        ("serve:\n  idle_minute: 20\n", "`serve` has no option 'idle_minute'"),
        ("serve:\n  name: x\n", "'name' names one launch"),
        ("serve: [1, 2\n", "is not valid YAML"),
        ("- 1\n", "give each command's defaults"),
    ):
        config.write_text(text)
        assert_one_line_error(cli("serve", "--name", "Qwen/Qwen2.5-7B", "--dryrun"), str(config), fragment)
    config.write_text("serve:\n  idle_minutes: 0.01\n")
    assert_one_line_error(cli("serve", "--name", "Qwen/Qwen2.5-7B", *GPU, "--dryrun"), "--idle_minutes 0.01")
