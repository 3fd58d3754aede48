"""``llm-atc bench``: a bounded load test of a live deployment with guidellm, in figures a person can act on.

guidellm (vLLM's load generator, in an environment of its own: ``llm-atc engines install guidellm``)
sends synthetic prompts of a fixed length to the endpoint at each concurrency in turn, each level bounded
in seconds and in requests, streaming, with the deployment's API key. From its JSON we keep, per level:
time to first token p50/p95, inter-token latency p50/p95, output tokens per second, and the requests that
succeeded or failed; with the deployment's hourly price (SkyPilot's catalog, or ``--price_per_hour``) that
gives dollars per million output tokens.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llm_atc import credentials, engines, ui
from llm_atc.app import lifecycle
from llm_atc.app.cost import OWN_INFRA, cheapest_offer
from llm_atc.app.lifecycle import reconcile
from llm_atc.engines import GUIDELLM_VERSION
from llm_atc.errors import LaunchError, UserError
from llm_atc.options import shorten
from llm_atc.registry import Record, Registry, Status

DEFAULT_CONCURRENCY = (1, 4, 16)
DEFAULT_PROMPT_TOKENS = 256
DEFAULT_OUTPUT_TOKENS = 128
DEFAULT_DURATION = 20  # seconds per concurrency level
DEFAULT_MAX_REQUESTS = 200  # per concurrency level
LIMITS = {
    "--concurrency": (1, 1024),
    "--prompt_tokens": (1, 131_072),
    "--output_tokens": (1, 32_768),
    "--duration": (1, 600),
    "--max_requests": (1, 100_000),
}
MAX_LEVELS = 8
STARTUP_ALLOWANCE = 120  # seconds guidellm may take to start and to finish, beyond the levels' own bounds
# guidellm's progress lines on stderr (one at each level's start, then every 10 s, and at its end).
PROGRESS = re.compile(
    r"Benchmark (\d+) \((\w+)@([\d.]+)\): (\w+) \| elapsed=([\d.]+)s \| successful=(\d+) errored=(\d+)"
)


@dataclass(frozen=True)
class Load:
    """What to send: the prompt and reply lengths, the concurrencies, and each level's bounds."""

    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    output_tokens: int = DEFAULT_OUTPUT_TOKENS
    duration: int = DEFAULT_DURATION
    max_requests: int = DEFAULT_MAX_REQUESTS

    @property
    def bound_seconds(self) -> int:
        """The longest the whole run may take."""
        return len(self.concurrency) * self.duration + STARTUP_ALLOWANCE


def _whole(value, option: str) -> int:
    low, high = LIMITS[option]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = value if isinstance(value, int) else shorten(str(value))
        raise UserError(f"{option} {shown}: give a whole number from {low} to {high}")
    return value


def parse_load(
    concurrency: str | None = None,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    output_tokens: int = DEFAULT_OUTPUT_TOKENS,
    duration: int = DEFAULT_DURATION,
    max_requests: int = DEFAULT_MAX_REQUESTS,
) -> Load:
    """Check the load options (one-line errors naming the option)."""
    levels: tuple[int, ...] = DEFAULT_CONCURRENCY
    if concurrency is not None:
        parts = [part.strip() for part in str(concurrency).split(",")]
        if not all(re.fullmatch(r"\d{1,5}", part) for part in parts):
            raise UserError(
                f"--concurrency {shorten(str(concurrency))}: give whole numbers separated by commas, e.g. 1,4,16"
            )
        levels = tuple(_whole(int(part), "--concurrency") for part in parts)
        if len(set(levels)) != len(levels):
            raise UserError(f"--concurrency {concurrency}: a level is given twice")
        if len(levels) > MAX_LEVELS:
            raise UserError(f"--concurrency {shorten(str(concurrency))}: at most {MAX_LEVELS} levels")
    return Load(
        tuple(sorted(levels)),
        _whole(prompt_tokens, "--prompt_tokens"),
        _whole(output_tokens, "--output_tokens"),
        _whole(duration, "--duration"),
        _whole(max_requests, "--max_requests"),
    )


def check_price(price: float | None) -> float | None:
    if price is not None and (not math.isfinite(price) or not 0 <= price <= 10_000):
        raise UserError(f"--price_per_hour {price:g}: give dollars per hour, from 0 to 10000")
    return price


@dataclass(frozen=True)
class Level:
    """One concurrency level's figures (milliseconds, tokens per second, dollars)."""

    concurrency: int
    successful: int
    errored: int
    incomplete: int
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    output_tokens_per_second: float
    duration_s: float
    usd_per_million_output_tokens: float | None = None
    requests_per_second: float = 0.0
    latency_p50_ms: float = 0.0  # a whole request, sent to answered
    latency_p95_ms: float = 0.0
    input_tokens_per_second: float = 0.0
    usd_per_million_input_tokens: float | None = None  # embeddings: what a million embedded tokens cost


@dataclass
class Report:
    """A whole run: what was measured, how, and where its files are."""

    deployment: str
    model: str
    endpoint: str
    load: Load
    levels: list[Level]
    price_per_hour: float | None
    price_source: str
    task: str = "generate"  # what was measured: generate (chat completions, streamed) or embed (/v1/embeddings)
    tool: str = f"guidellm {GUIDELLM_VERSION}"
    raw: str = ""  # guidellm's own JSON
    plot: str = ""
    errors: list[str] = field(default_factory=list)  # the first error messages guidellm recorded

    def to_dict(self) -> dict:
        data = asdict(self)
        data["load"]["concurrency"] = list(self.load.concurrency)
        return data


def deployment(name: str, registry: Registry) -> Record:
    """The running deployment ``name`` (or on cluster ``name``); one-line errors otherwise."""

    record = registry.find(name, kind="serve")
    reconcile([record], registry)
    if record.status != Status.RUNNING:
        raise UserError(f"{record.cluster} is {record.status}, so there is nothing to measure; see `llm-atc status`")
    return record


def pick_model(record: Record, model: str | None) -> tuple[str, str]:
    """(the served name to load, where its weights are: its tokenizer's source)."""
    served = record.details.get("models") or [{"name": record.name, "model": record.model}]
    if model is None:
        return served[0]["name"], served[0]["model"]
    for entry in served:
        if entry["name"] == model:
            return entry["name"], entry["model"]
    names = ", ".join(entry["name"] for entry in served)
    raise UserError(f"--model {shorten(model)}: {record.cluster} serves {names}")


def tokenizer_for(location: str, record: Record) -> str:
    """A tokenizer guidellm can load offline where possible: a folder here, the tokenizer files of a bucket
    checkpoint (fetched here, weights left out), else the Hub id."""
    if "://" in location:
        from llm_atc.paths import home
        from llm_atc.storage import BucketURI, download_checkpoint, store_env

        uri = BucketURI.parse(location)
        dest = home() / "cache" / "tokenizers" / uri.scheme / uri.bucket / uri.prefix
        with store_env(record.details.get("store_env") or {}), ui.spinner(f"Fetching the tokenizer of {uri}"):
            return str(download_checkpoint(uri, dest, skip="*.safetensors"))
    return location


def hourly_price(record: Record, price: float | None) -> tuple[float | None, str]:
    """(dollars per hour, where the figure comes from)."""
    if price is not None:
        return price, "--price_per_hour"

    recorded = record.price
    if recorded.get("per_hour") is not None:  # what it was launched at (the catalog then, or --price_per_hour)
        return recorded["per_hour"], recorded["source"]
    if record.is_local or record.cloud in OWN_INFRA or not record.accelerator:
        return None, "no catalog price for this infra: pass --price_per_hour"
    wanted = []
    for part in record.accelerator.split(","):
        name, _, count = part.partition(":")
        wanted.append((name, int(count or 1)))
    offer = cheapest_offer(wanted, record.cloud, record.region, use_spot=False)
    if offer is None:
        return None, "SkyPilot's catalog here lists no such offer: pass --price_per_hour"
    where = " ".join(str(p) for p in (offer.cloud, offer.instance_type, offer.region(False)) if p)
    return offer.price, f"SkyPilot's catalog: {offer.accelerator}:{offer.count} on {where}, on-demand"


def run(
    record: Record,
    *,
    model: str | None,
    load: Load,
    tokenizer: str | None,
    price: float | None,
    registry: Registry,
    out_dir: Path,
) -> Report:
    """Measure ``record``'s endpoint under ``load``; the report (its plot and guidellm's JSON in ``out_dir``)."""

    served, location = pick_model(record, model)
    task = measurable_task(record, served)
    price, source = hourly_price(record, check_price(price))
    tool = engines.installed("guidellm") or engines.install("guidellm")
    tokenizer = tokenizer or tokenizer_for(location, record)
    api_key = credentials.get(record.cluster)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "guidellm.json"
    if record.details.get("private"):
        from llm_atc.tunnel import forward

        with forward(record) as tunnel:
            levels, errors = _measure(tool, tunnel.endpoint, served, tokenizer, api_key, load, raw, record, task)
        endpoint = tunnel.endpoint
    else:
        endpoint = lifecycle.endpoint(record, registry=registry)[1]
        levels, errors = _measure(tool, endpoint, served, tokenizer, api_key, load, raw, record, task)
    if price is not None:
        levels = [
            Level(
                **{
                    **asdict(level),
                    "usd_per_million_output_tokens": _per_million(price, level.output_tokens_per_second),
                    "usd_per_million_input_tokens": _per_million(price, level.input_tokens_per_second),
                }
            )
            for level in levels
        ]
    return Report(record.cluster, served, endpoint, load, levels, price, source, task, raw=str(raw), errors=errors)


def measurable_task(record: Record, served: str) -> str:
    """What ``bench`` sends ``served``: chat completions to a generative model, embeddings to an embedding
    model; a one-line error for what guidellm cannot send (rerank, classification)."""
    task = record.task_of(served)
    if task not in ("generate", "embed"):
        raise UserError(
            f"{served} serves {task}: bench measures chat and embedding models (guidellm {GUIDELLM_VERSION} sends "
            "no rerank or classification requests)"
        )
    return task


def _per_million(price: float, tokens_per_second: float) -> float | None:
    if tokens_per_second <= 0:
        return None
    return price / (tokens_per_second * 3600) * 1_000_000


def _measure(tool, endpoint, served, tokenizer, api_key, load: Load, raw: Path, record: Record, task: str):
    """Run guidellm against ``endpoint``; (levels, first error messages)."""
    embed = task == "embed"
    output_tokens = 1 if embed else load.output_tokens
    args = [
        str(tool.bin / "guidellm"),
        "run",
        "--backend",
        f"kind=openai_http,target={endpoint.rstrip('/')},model={served}"
        + (",request_format=/v1/embeddings" if embed else ""),
        "--tokenizer",
        f"kind=hf_auto,model={tokenizer}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={load.prompt_tokens},output_tokens={output_tokens}",
        "--profile",
        "kind=concurrent",
        "--override",
        "profile.streams",
        ",".join(map(str, load.concurrency)),
        "--constraint",
        f"kind=max_duration,seconds={load.duration}",
        "--constraint",
        f"kind=max_requests,count={load.max_requests}",
        "--metrics",
        "kind=generative,sample_size=0",
        "--output",
        f"kind=json,path={raw}",
        "--disable-console",
    ]
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
    if Path(tokenizer).is_dir():
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if api_key:
        env["GUIDELLM__SPEC__BACKEND__API_KEY"] = api_key  # not on the command line
    if record.details.get("tls_cert"):
        env["SSL_CERT_FILE"] = record.details["tls_cert"]
    raw.unlink(missing_ok=True)
    log = raw.with_suffix(".log")
    _follow(args, env, load, log)
    try:
        data = json.loads(raw.read_text())
    except (OSError, ValueError):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:]) if log.is_file() else ""
        raise LaunchError(f"guidellm wrote no results (log: {log})\n{tail}") from None
    levels, errors = parse_results(data)
    if not levels or all(level.successful == 0 for level in levels):
        why = f": {errors[0]}" if errors else ""
        raise LaunchError(f"no request to {served} at {endpoint} succeeded{why}; guidellm's log: {log}")
    return levels, errors


def _follow(args: list[str], env: dict, load: Load, log: Path) -> None:
    """Run guidellm within the load's time bound, showing which level runs and how far it got."""
    start, total = time.monotonic(), len(load.concurrency)
    with log.open("w") as handle, ui.spinner(f"Measuring at concurrency {', '.join(map(str, load.concurrency))}") as s:
        process = subprocess.Popen(
            args, stdout=handle, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, env=env
        )
        try:
            for line in process.stderr or ():
                handle.write(line)
                match = PROGRESS.search(line)
                if match:
                    level, _, streams, state, elapsed, ok, failed = match.groups()
                    s.update(
                        time.monotonic() - start,
                        f"level {level}/{total} (concurrency {float(streams):g}): {state}, {float(elapsed):.0f}s, "
                        f"{ok} done, {failed} failed",
                    )
                if time.monotonic() - start > load.bound_seconds:
                    break
            process.wait(timeout=max(1.0, load.bound_seconds - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            pass
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
                raise LaunchError(f"guidellm ran past its bound of {load.bound_seconds}s and was stopped; log: {log}")
    if process.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
        raise LaunchError(f"guidellm failed (exit {process.returncode}); log: {log}\n{tail}")


def _percentile(metrics: dict, name: str, p: str) -> float:
    """A percentile of the successful requests' ``name`` (0 when none succeeded)."""
    found = ((metrics.get(name) or {}).get("successful") or {}).get("percentiles") or {}
    return float(found.get(p) or 0.0)


def _rate(metrics: dict, name: str) -> float:
    """The level's mean rate ``name`` over all its requests (0 when guidellm has none)."""
    return float(((metrics.get(name) or {}).get("total") or {}).get("mean") or 0.0)


def parse_results(data: dict) -> tuple[list[Level], list[str]]:
    """Each concurrency level of guidellm's JSON, in its order, and up to three error messages."""
    levels: list[Level] = []
    errors: list[str] = []
    for bench in data.get("benchmarks", []):
        metrics = bench["metrics"]
        totals = metrics["request_totals"]
        levels.append(
            Level(
                concurrency=int(bench["config"]["strategy"]["streams"]),
                successful=int(totals["successful"]),
                errored=int(totals["errored"]),
                incomplete=int(totals["incomplete"]),
                ttft_p50_ms=_percentile(metrics, "time_to_first_token_ms", "p50"),
                ttft_p95_ms=_percentile(metrics, "time_to_first_token_ms", "p95"),
                itl_p50_ms=_percentile(metrics, "inter_token_latency_ms", "p50"),
                itl_p95_ms=_percentile(metrics, "inter_token_latency_ms", "p95"),
                output_tokens_per_second=float(metrics["output_tokens_per_second"]["total"]["mean"]),
                duration_s=float(bench.get("duration") or 0.0),
                requests_per_second=_rate(metrics, "requests_per_second"),
                latency_p50_ms=_percentile(metrics, "request_latency", "p50") * 1000,
                latency_p95_ms=_percentile(metrics, "request_latency", "p95") * 1000,
                input_tokens_per_second=_rate(metrics, "prompt_tokens_per_second"),
            )
        )
        for request in (bench.get("requests") or {}).get("errored") or []:
            message = str((request.get("info") or {}).get("error") or "")
            if message and len(errors) < 3 and message not in errors:
                errors.append(message[:300])
    return levels, errors
