"""Output tokens/s on this machine's CPU: vLLM (CPU build) against `transformers serve`, same run.

Both are started by `llm-atc serve --cloud local` on the same tiny model (built offline) and get the
same load: CONCURRENCY streams at once, each asking for TOKENS tokens (ignore_eos where the engine
supports it). Tokens are the engine's own count (the stream's usage) where it reports one, else one
per streamed chunk. Run:
    .venv/bin/python benchmarks/cpu_throughput.py [--concurrency 8] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from llm_atc.demo import build_tiny_model  # noqa: E402

BIN = Path(sys.executable).parent


def serve(engine: str, model: Path, env: dict) -> str:
    extra = ["--max_model_len", "256", "--envs", "VLLM_CPU_KVCACHE_SPACE=1"] if engine == "vllm" else []
    done = subprocess.run(
        [
            str(BIN / "llm-atc"),
            "serve",
            "--name",
            str(model),
            "--cloud",
            "local",
            "--engine",
            engine,
            "--port",
            "0",
            "-c",
            f"bench-{engine}",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("Endpoint:"))


def one_stream(base_url: str, model: str, tokens: int, engine: str) -> int:
    """Stream one reply; the number of tokens it had."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", timeout=300, max_retries=0)
    extra = {"ignore_eos": True, "min_tokens": tokens} if engine == "vllm" else {}
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=tokens,
        stream=True,
        extra_body=extra,
        stream_options={"include_usage": True},
    )
    chunks, usage = 0, None
    for chunk in stream:
        chunks += bool(chunk.choices and chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    return usage.completion_tokens if usage else chunks


def load(base_url: str, model: str, engine: str, concurrency: int, tokens: int) -> tuple[float, int]:
    """(output tokens per second, tokens) for CONCURRENCY simultaneous streams."""
    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        count = sum(pool.map(lambda _: one_stream(base_url, model, tokens, engine), range(concurrency)))
    return count / (time.monotonic() - start), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    from llm_atc import engines

    engine_env = engines.require("vllm", why="this benchmark")
    work = Path(tempfile.mkdtemp(prefix="llm-atc-bench-"))
    model = build_tiny_model(work / "tiny")
    env = {
        **os.environ,
        "HOME": str(work),
        "LLM_ATC_HOME": str(work / ".llm_atc"),
        "HF_HUB_OFFLINE": "1",
        "LLM_ATC_ENGINES": str(engine_env.path.parent),
    }
    results = {}
    for engine in ("vllm", "transformers"):
        base_url = serve(engine, model, env)
        try:
            load(base_url, str(model), engine, 1, 4)  # warm-up
            rates = []
            for _ in range(options.rounds):
                rate, count = load(base_url, str(model), engine, options.concurrency, options.tokens)
                rates.append(rate)
                print(f"{engine}: {rate:.1f} output tokens/s ({count} tokens)", flush=True)
            results[engine] = statistics.median(rates)
        finally:
            subprocess.run([str(BIN / "llm-atc"), "stop", f"bench-{engine}"], env=env, capture_output=True)
    print(f"{options.concurrency} streams x {options.tokens} tokens, median of {options.rounds}:")
    print(f"  vLLM (CPU build)     {results['vllm']:8.1f} output tokens/s")
    print(f"  transformers serve   {results['transformers']:8.1f} output tokens/s")
    print(f"  ratio                {results['vllm'] / results['transformers']:8.2f}x")


if __name__ == "__main__":
    main()
