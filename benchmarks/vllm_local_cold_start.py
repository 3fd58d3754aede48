"""Local cold start of vLLM: `llm-atc serve --engine vllm --cloud local` against the same vLLM server
started by hand, with the same model and flags, in the same run.

Both are timed from the command's start to the first streamed chat token, on the tiny model (built
offline) with vLLM's CPU build from `llm-atc engines install vllm`. A first round of each warms vLLM's
compile cache and is not counted; then the two alternate. Target: median ratio <= 1.05. Run:
    .venv/bin/python benchmarks/vllm_local_cold_start.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from local_ready import first_token, free_port  # noqa: E402  (this folder is on sys.path)

from llm_atc.demo import build_tiny_model  # noqa: E402

BIN = Path(sys.executable).parent
FLAGS = ["--max_model_len", "256"]
ENVS = "VLLM_CPU_KVCACHE_SPACE=1"


def via_llm_atc(model: Path, env: dict, run: int) -> tuple[float, list[str]]:
    """Seconds to the first token, and the command llm-atc ran (from its log)."""
    cluster = f"bench-{run}"
    start = time.monotonic()
    done = subprocess.run(
        [
            str(BIN / "llm-atc"),
            "serve",
            "--name",
            str(model),
            "--cloud",
            "local",
            "--engine",
            "vllm",
            "--port",
            "0",
            "-c",
            cluster,
            *FLAGS,
            "--envs",
            ENVS,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    base_url = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("Endpoint:"))
    first_token(base_url, str(model))
    took = time.monotonic() - start
    log = Path(env["LLM_ATC_HOME"]) / "local" / cluster / "server.log"
    line = next(line for line in log.read_text().splitlines() if line.startswith("llm-atc: starting "))
    subprocess.run([str(BIN / "llm-atc"), "stop", cluster], env=env, check=True, capture_output=True)
    return took, shlex.split(line.removeprefix("llm-atc: starting "))


def by_hand(command: list[str], python: Path, model: Path, env: dict) -> float:
    """The same command, with the port changed, run straight from the engine's Python."""
    port = free_port()
    argv = [str(python), *command[1:]]
    argv[argv.index("--port") + 1] = str(port)
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        env={**env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        first_token(f"http://127.0.0.1:{port}/v1", str(model))
        return time.monotonic() - start
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    from llm_atc import engines

    engine = engines.require("vllm", why="this benchmark")
    work = Path(tempfile.mkdtemp(prefix="llm-atc-bench-"))
    model = build_tiny_model(work / "tiny")
    env = {
        **os.environ,
        "HOME": str(work),
        "LLM_ATC_HOME": str(work / ".llm_atc"),
        "HF_HUB_OFFLINE": "1",
        "LLM_ATC_ENGINES": str(engine.path.parent),
    }
    _, command = via_llm_atc(model, env, 0)  # warms the compile cache; its command is the one run by hand
    by_hand(command, engine.python, model, env)
    ours, plain = [], []
    for run in range(1, runs + 1):
        plain.append(by_hand(command, engine.python, model, env))
        ours.append(via_llm_atc(model, env, run)[0])
        print(f"round {run}: llm-atc {ours[-1]:.2f}s, by hand {plain[-1]:.2f}s", flush=True)
    o, p = statistics.median(ours), statistics.median(plain)
    print(f"command: {shlex.join(command)}")
    print(f"vLLM by hand -> first token          {p:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in plain)})")
    print(f"llm-atc serve --cloud local -> token {o:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in ours)})")
    print(f"ratio of medians                     {o / p:6.2f}    (target <= 1.05)")


if __name__ == "__main__":
    main()
