"""What the endpoint of several models adds to a request: llm-atc's gateway and vLLM's router in front of
the engines, against the same engine asked directly, in the same run.

`llm-atc serve --name A --name B --cloud local` (two tiny models, vLLM's CPU build); then, per round, 100
short chat requests (1 output token, one at a time, on a kept-alive connection) straight to engine A's own
port and 100 through the endpoint, in alternating order. Reports the p50 latency of each and the difference.
Target: <= 5 ms added. Run:
    python benchmarks/router_overhead.py [--rounds 3] [--requests 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llm_atc.demo import build_tiny_model

BIN = Path(sys.executable).parent
KEY = "router-overhead"


def p50_ms(url: str, model: str, requests: int) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        for _ in range(5):  # warm the connection and the engine
            client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm-atc-bench-router-"))
    a, b = build_tiny_model(work / "model-a"), build_tiny_model(work / "model-b")
    home = work / ".llm_atc"
    engines = os.environ.get("LLM_ATC_ENGINES") or str(Path.home() / ".llm_atc" / "engines")
    env = {**os.environ, "LLM_ATC_HOME": str(home), "LLM_ATC_ENGINES": engines, "HF_HUB_OFFLINE": "1"}
    serve = [str(BIN / "llm-atc"), "serve", "--name", str(a), "--name", str(b), "--cloud", "local", "--port", "0"]
    serve += ["-c", "router-bench", "--secret", f"VLLM_API_KEY={KEY}", "--max_model_len", "256"]
    serve += ["--envs", "VLLM_CPU_KVCACHE_SPACE=1"]
    done = subprocess.run(serve, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    try:
        os.environ["LLM_ATC_HOME"] = str(home)
        from llm_atc.registry import Registry

        record = Registry().find("router-bench")
        endpoint = record.endpoint
        engine = f"http://127.0.0.1:{record.details['models'][0]['engine_port']}"
        direct, routed = [], []
        for round_ in range(args.rounds):
            order = [(engine, direct), (endpoint, routed)]
            for url, results in order if round_ % 2 == 0 else reversed(order):
                results.append(p50_ms(url, str(a), args.requests))
            print(f"round {round_ + 1}: engine {direct[-1]:6.2f} ms   endpoint {routed[-1]:6.2f} ms")
        d, r = statistics.median(direct), statistics.median(routed)
        print(f"p50 straight to the engine        {d:6.2f} ms  (rounds: {', '.join(f'{t:.2f}' for t in direct)})")
        print(f"p50 through gateway + vLLM router {r:6.2f} ms  (rounds: {', '.join(f'{t:.2f}' for t in routed)})")
        print(f"added                             {r - d:6.2f} ms  (target <= 5 ms)")
    finally:
        subprocess.run([str(BIN / "llm-atc"), "stop", "router-bench"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
