"""Money wasted after the last request: on the local Slurm cluster, a vLLM (CPU) deployment served with
`--idle_minutes N` gets one chat request; the figure is the time from that request's answer until SkyPilot and
Slurm have no trace of the cluster (no `sky status` entry, no Slurm job), minus N minutes. Goal: <= 3 minutes.

    .venv/bin/python benchmarks/idle_teardown.py [--idle_minutes 1] [--rounds 1]

Needs `sudo bash scripts/slurm-up.sh` first. Uses a temporary HOME with its own SkyPilot API server port; nothing
is torn down by hand unless the deployment outlives the bound (then it is, and the round says so).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from local_ready import first_token, free_port
from slurm_overhead import NODE_ENVS, run, slurm_setup

from llm_atc.demo import build_tiny_model

BIN = Path(sys.executable).parent
KEY = "llm-atc-idle-benchmark"
BOUND = 15 * 60  # seconds after the idle time before a round gives up


def gone(cluster: str, env: dict) -> bool:
    listed = subprocess.run([str(BIN / "sky"), "status", cluster], env=env, capture_output=True, text=True).stdout
    jobs = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
    return cluster not in listed and not any(job.startswith(cluster + "-") for job in jobs)


def one_round(env: dict, model: Path, region: str, cluster: str, idle: float) -> float | None:
    port = free_port()
    run(
        [str(BIN / "llm-atc"), "serve", "--name", str(model), "--cloud", "slurm", "--region", region, "--cpus", "1",
         "--port", str(port), "-c", cluster, "-y", "--timeout", "1200", "--envs", NODE_ENVS,
         "--secret", f"VLLM_API_KEY={KEY}", "--idle_minutes", f"{idle:g}"],
        env,
    )  # fmt: skip
    first_token(f"http://127.0.0.1:{port}/v1", model.name, api_key=KEY)
    last_answer = time.monotonic()
    while time.monotonic() - last_answer < idle * 60 + BOUND:
        time.sleep(5)
        if gone(cluster, env):
            return time.monotonic() - last_answer - idle * 60
    subprocess.run([str(BIN / "llm-atc"), "down", cluster, "-y"], env=env, capture_output=True)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle_minutes", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=1)
    options = parser.parse_args()
    work, region, env = slurm_setup("llm-atc-bench-idle-")
    model = build_tiny_model(work / "tiny-model")
    try:
        for n in range(options.rounds):
            wasted = one_round(env, model, region, f"bench-idle-{n}", options.idle_minutes)
            if wasted is None:
                print(f"round {n + 1}: still there {BOUND / 60:.0f} min after the idle time (torn down by hand)")
            else:
                print(
                    f"round {n + 1}: gone {wasted + options.idle_minutes * 60:.0f}s after the last answer; "
                    f"wasted after --idle_minutes {options.idle_minutes:g}: {wasted:.0f}s (goal <= 180s)",
                    flush=True,
                )
    finally:  # this HOME's own API server and clusters only
        subprocess.run([str(BIN / "sky"), "down", "-a", "-y"], env=env, capture_output=True, timeout=600)
        subprocess.run([str(BIN / "sky"), "api", "stop"], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
