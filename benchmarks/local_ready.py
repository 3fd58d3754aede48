"""Readiness of `llm-atc serve --cloud local` against `transformers serve` run directly.

Both serve the same tiny model (built offline) and are timed from process start to
the first 200 from /health, in the same run. Target: ratio <= 1.2. Run:
    python benchmarks/local_ready.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from llm_atc.demo import build_tiny_model

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_token(base_url: str, model: str, *, api_key: str = "unused", timeout: float = 600) -> None:
    """Stream a chat until its first token, retrying while the server is not up yet (the benchmarks' finish line)."""
    from openai import APIConnectionError, APIStatusError, OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, timeout=30, max_retries=0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    stream.close()
                    return
        except (APIConnectionError, APIStatusError):
            time.sleep(0.05)
    raise TimeoutError(f"no token from {base_url} within {timeout}s")


def llm_atc(*args: str, env: dict) -> str:
    """``llm-atc ARGS`` with ``env``; its stdout (a RuntimeError with its stderr's tail when it fails)."""
    done = subprocess.run([str(BIN / "llm-atc"), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llm-atc {' '.join(args)}: {done.stderr[-3000:]}")
    return done.stdout


def serve_local(name: str, cluster: str, env: dict, *options: str) -> str:
    """`llm-atc serve --name NAME --cloud local --engine vllm --port 0 -c CLUSTER OPTIONS...` with a small
    context and KV cache; its base URL."""
    done = subprocess.run(
        [str(BIN / "llm-atc"), "serve", "--name", name, "--cloud", "local", "--engine", "vllm", "--port", "0"]
        + ["-c", cluster, "--max_model_len", "256", "--envs", "VLLM_CPU_KVCACHE_SPACE=1", *options],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("Endpoint:"))


def medians(label: str, times: list[float]) -> str:
    """One report line: the median and every run."""
    return f"{label:<42} {statistics.median(times):7.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times)})"


def wait_health(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not ready after {timeout}s")


def direct(model: Path, env: dict) -> float:
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "transformers"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_health(port)
        return time.perf_counter() - start
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def via_llm_atc(model: Path, env: dict, run: int) -> float:
    cluster = f"bench-{run}"
    start = time.perf_counter()
    subprocess.run(
        [str(BIN / "llm-atc"), "serve", "--name", str(model), "--cloud", "local", "--port", "0", "-c", cluster],
        env=env,
        check=True,
        capture_output=True,
    )
    took = time.perf_counter() - start
    subprocess.run([str(BIN / "llm-atc"), "stop", cluster], env=env, check=True, capture_output=True)
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    work = Path(tempfile.mkdtemp(prefix="llm-atc-bench-"))
    model = build_tiny_model(work / "tiny")
    env = {**os.environ, "HOME": str(work), "LLM_ATC_HOME": str(work / ".llm_atc"), "HF_HUB_OFFLINE": "1"}
    plain = [direct(model, env) for _ in range(runs)]
    ours = [via_llm_atc(model, env, i) for i in range(runs)]
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"transformers serve direct   {p:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in plain)})")
    print(f"llm-atc serve --cloud local {o:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in ours)})")
    print(f"ratio                       {o / p:6.2f}    (target <= 1.20)")


if __name__ == "__main__":
    main()
