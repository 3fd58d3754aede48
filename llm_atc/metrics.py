"""What an engine is doing, from its own Prometheus metrics (vLLM's ``/metrics``): two samples give a window's
rates and latency percentiles (from the histograms' bucket deltas, not since the engine started).

The metric names are data (``data/vllm-metrics.json``): vLLM deprecates a name in one release, hides it in the
next and removes it after, so the names the pinned release exports are checked against a live engine by a test.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
SPARK = "▁▂▃▄▅▆▇█"


@lru_cache(maxsize=1)
def names() -> dict[str, str]:
    """What llm-atc reads -> the pinned vLLM's metric name (``data/vllm-metrics.json``)."""
    return json.loads(resources.files("llm_atc").joinpath("data/vllm-metrics.json").read_text())["metrics"]


@dataclass
class Sample:
    """One read of an engine's ``/metrics``: its series by name, each as (labels, value), and when it was read."""

    at: float
    series: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def total(self, name: str, **labels: str) -> float:
        """The sum of a metric's series (those whose labels include ``labels``)."""
        return sum(v for found, v in self.series.get(name, ()) if all(found.get(k) == x for k, x in labels.items()))

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """A histogram's cumulative buckets (upper bound, count), summed over its other labels."""
        summed: dict[float, float] = {}
        for labels, value in self.series.get(name + "_bucket", ()):
            bound = math.inf if labels.get("le") in ("+Inf", "inf") else float(labels.get("le", "nan"))
            summed[bound] = summed.get(bound, 0.0) + value
        return sorted(summed.items())


def parse(text: str, at: float | None = None) -> Sample:
    """Prometheus' text format, as vLLM serves it."""
    sample = Sample(time.monotonic() if at is None else at)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(match.group(2) or ""))
        sample.series.setdefault(match.group(1), []).append((labels, value))
    return sample


def quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile (seconds) of what a histogram observed between two samples, interpolated linearly within
    its bucket (as Prometheus' ``histogram_quantile``); None when it observed nothing."""
    earlier = dict(before)
    deltas = [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]
    if not deltas or deltas[-1][1] <= 0:
        return None
    rank = q * deltas[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in deltas:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            span = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / span if span > 0 else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class Window:
    """What an engine did between two samples (per second, or as percentiles in milliseconds)."""

    seconds: float
    running: float  # vLLM's gauges at the second sample (its CPU build 0.32 leaves them at 0)
    waiting: float
    in_flight: float  # requests being served, on average over the window (the time they took / the window)
    kv_cache_usage: float | None
    prompt_tokens_per_second: float
    output_tokens_per_second: float
    requests_per_second: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    prefix_cache_hit_rate: float | None
    failed: float  # requests answered with an error (4xx/5xx) or aborted in the window
    usd_per_million_output_tokens: float | None = None


def window(before: Sample, after: Sample, price_per_hour: float | None = None) -> Window:
    """The window between two samples of one engine."""
    n = names()
    seconds = max(after.at - before.at, 1e-9)

    def rate(name: str) -> float:
        return max(0.0, after.total(name) - before.total(name)) / seconds

    def ms(name: str, q: float) -> float | None:
        found = quantile(before.buckets(name), after.buckets(name), q)
        return None if found is None else round(found * 1000, 2)

    e2e = n["e2e_latency"] + "_sum"  # Little's law: seconds of requests finished in the window, per second
    queries = after.total(n["prefix_queries"]) - before.total(n["prefix_queries"])
    hits = after.total(n["prefix_hits"]) - before.total(n["prefix_hits"])

    def grew(name: str, **labels: str) -> float:
        return max(0.0, after.total(name, **labels) - before.total(name, **labels))

    failed = grew(n["http_requests"], status="4xx") + grew(n["http_requests"], status="5xx")
    failed += grew(n["finished"], finished_reason="abort")
    output = rate(n["output_tokens"])
    kv = after.series.get(n["kv_cache_usage"])
    return Window(
        seconds=round(seconds, 2),
        running=after.total(n["running"]),
        waiting=after.total(n["waiting"]),
        in_flight=round(max(0.0, after.total(e2e) - before.total(e2e)) / seconds, 2),
        kv_cache_usage=sum(v for _, v in kv) / len(kv) if kv else None,
        prompt_tokens_per_second=round(rate(n["prompt_tokens"]), 2),
        output_tokens_per_second=round(output, 2),
        requests_per_second=round(max(0.0, _served(after) - _served(before)) / seconds, 3),
        ttft_p50_ms=ms(n["ttft"], 0.5),
        ttft_p95_ms=ms(n["ttft"], 0.95),
        itl_p50_ms=ms(n["itl"], 0.5),
        itl_p95_ms=ms(n["itl"], 0.95),
        prefix_cache_hit_rate=round(hits / queries, 4) if queries > 0 else None,
        failed=failed,
        usd_per_million_output_tokens=(
            round(price_per_hour / (output * 3600) * 1e6, 4) if price_per_hour is not None and output > 0 else None
        ),
    )


def _served(sample: Sample) -> float:
    """Requests the server answered, of every kind (chat, embeddings, rerank, ...), but model listings."""
    return sum(
        v for labels, v in sample.series.get(names()["http_requests"], ()) if labels.get("handler") != "/v1/models"
    )


def sparkline(values: list[float]) -> str:
    """A row of block characters, one per value, scaled to the largest."""
    top = max(values, default=0.0)
    if top <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))] for v in values)
