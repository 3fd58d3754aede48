"""`llm-atc bench`: guidellm (its own environment) against the session's real vLLM deployment, every figure
checked against its bounds, and every bad input refused before anything runs."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from support.cli import assert_one_line_error, run_cli, using_home

LOAD = ["--concurrency", "1,2", "--prompt_tokens", "16", "--output_tokens", "8", "--duration", "6"]
MAX_REQUESTS = 12


@pytest.fixture(scope="module")
def guidellm():
    """guidellm's environment (README's test command installs it with `llm-atc engines install`)."""
    from llm_atc import engines

    found = engines.installed("guidellm")
    if found is None:
        pytest.fail("guidellm is not installed for llm-atc: run `.venv/bin/llm-atc engines install guidellm`")
    return found


def test_bench_reports_every_figure_within_its_bounds(vllm_deployment, guidellm, tmp_path):
    plot = tmp_path / "charts.html"
    price = 0.75
    with using_home(vllm_deployment.home):
        start = time.monotonic()
        result = run_cli(
            "bench",
            vllm_deployment.cluster,
            *LOAD,
            "--max_requests",
            str(MAX_REQUESTS),
            "--price_per_hour",
            str(price),
            "--plot",
            str(plot),
            "--json",
        )
        took = time.monotonic() - start
    assert result.exit_code == 0, result
    report = json.loads(result.stdout)
    assert took < 2 * 6 + 120  # the levels' bounds and guidellm's start-up allowance
    assert report["deployment"] == vllm_deployment.cluster and report["model"] == vllm_deployment.model
    assert report["tool"] == "guidellm 0.8.1" and report["price_per_hour"] == price
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert 0 < level["successful"] <= MAX_REQUESTS and level["errored"] + level["successful"] <= MAX_REQUESTS
        assert 0 < level["ttft_p50_ms"] <= level["ttft_p95_ms"] < 60_000
        assert 0 <= level["itl_p50_ms"] <= level["itl_p95_ms"] < 60_000
        assert level["output_tokens_per_second"] > 0 and level["duration_s"] <= 6 + 5
        expected = price / (level["output_tokens_per_second"] * 3600) * 1e6
        assert level["usd_per_million_output_tokens"] == pytest.approx(expected)
    # The charts: a page of inline SVG (TTFT, ITL, throughput, cost), no scripts, nothing fetched.
    page = plot.read_text()
    assert report["plot"] == str(plot) and page.count("<svg") == 4 and "<script" not in page
    for svg in page.split("<svg")[1:]:
        ElementTree.fromstring("<svg" + svg.split("</svg>")[0] + "</svg>")  # well-formed
    assert "Time to first token" in page and "Cost per million output tokens" in page
    raw = json.loads(Path(report["raw"]).read_text())
    assert raw["benchmarks"] and "**" in json.dumps(raw["config"])  # guidellm masks the key it was given


def test_bench_table_without_a_catalog_price(vllm_deployment, guidellm):
    with using_home(vllm_deployment.home):
        result = run_cli("bench", vllm_deployment.cluster, *LOAD, "--max_requests", "6")
    assert result.exit_code == 0, result
    for heading in ("CONCURRENCY", "TTFT P50 MS", "TTFT P95 MS", "ITL P50 MS", "OUTPUT TOK/S", "$ / M OUTPUT TOK"):
        assert heading in result.stdout
    assert "no catalog price for this infra: pass --price_per_hour" in result.stderr
    assert "Charts: " in result.stderr and Path(result.stderr.split("Charts: ")[1].split()[0]).is_file()


@pytest.fixture
def stopped(llm_atc_home):
    from llm_atc.registry import Record, Registry, Status

    Registry().add(Record(name="old", kind="serve", model="m", cluster="old", status=Status.STOPPED, cloud="local"))
    return "old"


@pytest.mark.parametrize(
    "args, fragments, code",
    [
        (["nope"], ["no deployment named 'nope'"], 3),
        (["old"], ["old is STOPPED", "nothing to measure"], 2),
        (["old", "--concurrency", "0"], ["--concurrency 0", "from 1 to 1024"], 2),
        (["old", "--concurrency", "1,x"], ["--concurrency", "whole numbers"], 2),
        (["old", "--concurrency", "2,2"], ["given twice"], 2),
        (["old", "--concurrency", "1,2,3,4,5,6,7,8,9"], ["at most 8 levels"], 2),
        (["old", "--concurrency", "5000"], ["--concurrency 5000"], 2),
        (["old", "--duration", "0"], ["--duration 0"], 2),
        (["old", "--duration", "601"], ["--duration 601"], 2),
        (["old", "--max_requests", "0"], ["--max_requests 0"], 2),
        (["old", "--prompt_tokens", "-5"], ["--prompt_tokens -5"], 2),
        (["old", "--output_tokens", "0"], ["--output_tokens 0"], 2),
        (["old", "--price_per_hour", "nan"], ["--price_per_hour nan"], 2),
        (["old", "--price_per_hour", "-1"], ["--price_per_hour -1"], 2),
    ],
)
def test_bad_bench_input_runs_nothing(cli, stopped, llm_atc_home, args, fragments, code):
    result = cli("bench", *args)
    assert_one_line_error(result, *fragments)
    assert result.exit_code == code, result
    assert not (llm_atc_home / "bench").exists()


def test_bench_of_a_model_the_deployment_does_not_serve(vllm_deployment, guidellm):
    runs = vllm_deployment.home / "bench"
    before = sorted(runs.iterdir()) if runs.exists() else []
    with using_home(vllm_deployment.home):
        result = run_cli("bench", vllm_deployment.cluster, "--model", "other", *LOAD)
    assert_one_line_error(result, "--model 'other'", f"serves {vllm_deployment.model}")
    assert (sorted(runs.iterdir()) if runs.exists() else []) == before  # guidellm never started


def test_price_per_million_tokens_comes_from_the_catalog(catalog):
    """A deployment on a cloud is priced at the cheapest on-demand catalog offer of its GPUs; own clusters and
    this machine have none, and say how to give one."""
    from llm_atc.app.bench import Level, _per_million, hourly_price
    from llm_atc.app.cost import cheapest_offer
    from llm_atc.registry import Record

    record = Record(name="m", kind="serve", model="m", cluster="c", status="RUNNING", cloud="gcp", accelerator="L4:1")
    price, source = hourly_price(record, None)
    offer = cheapest_offer([("L4", 1)], "gcp", None, use_spot=False)
    assert price == offer.price and price > 0 and "SkyPilot's catalog: L4:1 on GCP" in source
    level = Level(1, 10, 0, 0, 1.0, 2.0, 0.1, 0.2, output_tokens_per_second=500.0, duration_s=5.0)
    assert _per_million(price, level.output_tokens_per_second) == pytest.approx(price / (500 * 3600) * 1e6)
    assert hourly_price(record, 2.5) == (2.5, "--price_per_hour")
    for cloud in ("local", "slurm"):
        mine = Record(name="m", kind="serve", model="m", cluster="c", status="RUNNING", cloud=cloud, accelerator="L4:1")
        assert hourly_price(mine, None) == (None, "no catalog price for this infra: pass --price_per_hour")
