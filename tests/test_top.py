"""`llm-atc top` (#24): windows of an engine's own metrics (rates and percentiles from histogram deltas), read from
the session's real vLLM server (CPU build) under load, with the key; the names it reads checked against that live
engine. Several models behind the gateway are in test_several.py, a private endpoint through its tunnel in
test_slurm.py."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from support.cli import assert_one_line_error, run_cli, using_home

from llm_atc import metrics

TEXT_BEFORE = """# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{le="0.5",model_name="m"} 4.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 4.0
vllm:generation_tokens_total{model_name="m"} 100.0
vllm:prompt_tokens_total{model_name="m"} 50.0
vllm:num_requests_running{model_name="m"} 0.0
http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx"} 4.0
"""
TEXT_AFTER = """vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{le="0.5",model_name="m"} 12.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 14.0
vllm:generation_tokens_total{model_name="m"} 300.0
vllm:prompt_tokens_total{model_name="m"} 90.0
vllm:num_requests_running{model_name="m"} 3.0
http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx"} 12.0
http_requests_total{handler="/v1/chat/completions",method="POST",status="4xx"} 2.0
"""


def test_a_window_is_the_difference_of_two_samples():
    before, after = metrics.parse(TEXT_BEFORE, at=10.0), metrics.parse(TEXT_AFTER, at=20.0)
    window = metrics.window(before, after, price_per_hour=3.6)
    assert window.output_tokens_per_second == 20.0 and window.prompt_tokens_per_second == 4.0
    assert window.running == 3 and window.failed == 2 and window.in_flight == 0  # no e2e histogram in the text
    # 10 observations in the window: 8 in (0.1, 0.5], 2 above 0.5; the median is the 5th: 0.1 + 0.4 * 5/8
    assert window.ttft_p50_ms == pytest.approx(350.0) and window.ttft_p95_ms == pytest.approx(500.0)
    assert window.usd_per_million_output_tokens == pytest.approx(3.6 / (20 * 3600) * 1e6)
    idle = metrics.window(after, metrics.parse(TEXT_AFTER, at=25.0))
    assert idle.output_tokens_per_second == 0 and idle.ttft_p50_ms is None
    assert metrics.sparkline([0, 1, 2, 4]) == "▁▃▅█" and metrics.sparkline([0, 0]) == "▁▁"


def test_the_names_read_are_what_the_pinned_vllm_exports(vllm_deployment):
    text = httpx.get(
        vllm_deployment.base_url.removesuffix("/v1") + "/metrics",
        headers={"Authorization": f"Bearer {vllm_deployment.api_key}"},
        timeout=30,
    ).text
    exported = set(metrics.parse(text).series)
    for what, name in metrics.names().items():
        assert name in exported or name + "_bucket" in exported, (what, name)


def _load(deployment, stop: threading.Event, ttfts: list[float]) -> None:
    """Chat streams one after another until ``stop``; each one's time to first token, as the client sees it."""
    client = deployment.client()
    while not stop.is_set():
        start = time.monotonic()
        stream = client.chat.completions.create(
            model=deployment.model, messages=[{"role": "user", "content": "Count"}], max_tokens=48, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.monotonic() - start
        if first is not None:
            ttfts.append(first * 1000)


def test_top_once_under_load_then_idle(vllm_deployment):
    stop, ttfts = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(vllm_deployment, stop, ttfts)) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)  # the load is up
        with using_home(vllm_deployment.home):
            busy = run_cli("top", vllm_deployment.cluster, "--once", "--json", "--interval", "4")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert busy.exit_code == 0, busy
    (row,) = json.loads(busy.stdout)["rows"]
    window = row["window"]
    assert row["deployment"] == vllm_deployment.cluster and window["output_tokens_per_second"] > 0
    assert window["in_flight"] > 0.5 and window["requests_per_second"] > 0 and window["failed"] == 0
    client_sorted = sorted(ttfts)
    assert 0 < window["ttft_p50_ms"] <= client_sorted[int(0.95 * (len(client_sorted) - 1))] + 50
    assert window["ttft_p95_ms"] <= client_sorted[-1] * 1.5 + 100  # server-side: no HTTP, no client overhead
    assert window["itl_p50_ms"] is not None and window["kv_cache_usage"] is not None
    time.sleep(1)
    with using_home(vllm_deployment.home):
        quiet = run_cli("top", vllm_deployment.cluster, "--once", "--json", "--interval", "2")
    (row,) = json.loads(quiet.stdout)["rows"]
    assert row["window"]["output_tokens_per_second"] == 0 and row["window"]["in_flight"] == 0
    with using_home(vllm_deployment.home):
        table = run_cli("top", vllm_deployment.cluster, "--once", "--interval", "1")
    assert "TTFT P50/P95 MS" in table.stdout and vllm_deployment.cluster in table.stdout


def test_bad_top_input_is_one_line(cli):
    assert_one_line_error(cli("top", "no-such-deployment"), "no deployment named 'no-such-deployment'")
    assert_one_line_error(cli("top", "--interval", "0"), "--interval 0", "from 0.5 to 3600")
    assert_one_line_error(cli("top", "--json"), "--json goes with --once")
