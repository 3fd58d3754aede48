"""The cost of watching: output tokens/s of a local vLLM deployment (CPU build, the tiny model) under the same load,
without and with `llm-atc top` sampling it at its default interval, in alternating rounds of one run.

The load: --concurrency chat requests in flight, 48 tokens each (ignore_eos), for --seconds. Goal: watching costs
at most 1% of the throughput.

    .venv/bin/python benchmarks/top_overhead.py [--rounds 3] [--seconds 30] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from llm_atc.demo import build_tiny_model

BIN = Path(sys.executable).parent
KEY = "top-overhead"
TOKENS = 48


def throughput(url: str, model: str, seconds: float, concurrency: int) -> float:
    """Output tokens per second of ``concurrency`` request loops over ``seconds``."""
    done, deadline = [], time.monotonic() + seconds
    body = {"model": model, "messages": [{"role": "user", "content": "Count"}], "max_tokens": TOKENS,
            "ignore_eos": True}  # fmt: skip

    def loop():
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            while time.monotonic() < deadline:
                answer = client.post(f"{url}/v1/chat/completions", json=body)
                answer.raise_for_status()
                done.append(answer.json()["usage"]["completion_tokens"])

    start = time.monotonic()
    threads = [threading.Thread(target=loop) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--concurrency", type=int, default=4)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm-atc-bench-top-"))
    engines = os.environ.get("LLM_ATC_ENGINES") or str(Path.home() / ".llm_atc" / "engines")
    env = {**os.environ, "LLM_ATC_HOME": str(work / "home"), "LLM_ATC_ENGINES": engines, "HF_HUB_OFFLINE": "1"}
    model = build_tiny_model(work / "tiny-model")
    serve = [str(BIN / "llm-atc"), "serve", "--name", str(model), "--cloud", "local", "--port", "0", "-c", "watched"]
    serve += ["--secret", f"VLLM_API_KEY={KEY}", "--envs", "VLLM_CPU_KVCACHE_SPACE=1", "--max_model_len", "256"]
    done = subprocess.run(serve, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    url = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("Endpoint: ")).removesuffix(
        "/v1"
    )
    results: dict[str, list[float]] = {"without top": [], "with top": []}
    try:
        throughput(url, str(model), 5, options.concurrency)  # warm up
        for n in range(options.rounds):
            results["without top"].append(throughput(url, str(model), options.seconds, options.concurrency))
            watcher = subprocess.Popen([str(BIN / "llm-atc"), "top", "watched"], env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)  # fmt: skip
            try:
                results["with top"].append(throughput(url, str(model), options.seconds, options.concurrency))
            finally:
                watcher.terminate()
                watcher.wait(30)
            print(f"round {n + 1}: without top {results['without top'][-1]:.1f} tok/s, "
                  f"with top {results['with top'][-1]:.1f} tok/s", flush=True)  # fmt: skip
        without, with_top = (statistics.median(results[k]) for k in ("without top", "with top"))
        print(f"median of {options.rounds}: without top {without:.1f} tok/s, with top (every 5 s) {with_top:.1f} "
              f"tok/s: {100 * (without - with_top) / without:+.2f}% lower (goal <= 1%)")  # fmt: skip
    finally:
        subprocess.run([str(BIN / "llm-atc"), "stop", "watched"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
