"""llm-atc's overhead on a real Slurm launch, against bare `sky launch` of the same task.

Both sides serve the tiny model (built offline) with the vLLM recipe (vLLM's CPU build on the node;
`--engine transformers` for the other recipe) on the local Slurm cluster (`sudo bash
scripts/slurm-up.sh` first) and are timed, in the same run, from the command's start to the first
streamed chat token:

  llm-atc: `llm-atc serve --name <folder> --cloud slurm ...`, then a chat;
  bare:    `sky launch -d` of the task YAML llm-atc renders (`--dryrun`), a curl-style loop on
           /health, then the same chat.

Both use the same API key (`--secret VLLM_API_KEY`). Target: ratio <= 1.1. Run:
    .venv/bin/python benchmarks/slurm_overhead.py [--rounds 3] [--engine transformers]
Uses a temporary HOME with its own SkyPilot API server port, and tears every cluster down.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from local_ready import first_token, free_port, wait_health  # noqa: E402  (this folder is on sys.path)

from llm_atc.demo import build_tiny_model  # noqa: E402

BIN = Path(sys.executable).parent
NODE_ENVS = "TORCH_SPEC=torch==2.13.0+cpu UV_FIND_LINKS=/opt/wheels VLLM_CPU_TORCH_INDEX= VLLM_CPU_KVCACHE_SPACE=1"
KEY = "llm-atc-benchmark-key"


def run(args: list[str], env: dict) -> None:
    done = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:3])} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )


def serve_args(model: Path, region: str, cluster: str, port: int, engine: str) -> list[str]:
    return [
        str(BIN / "llm-atc"),
        "serve",
        "--name",
        str(model),
        "--cloud",
        "slurm",
        "--region",
        region,
        "--engine",
        engine,
        "--cpus",
        "1",
        "--port",
        str(port),
        "-c",
        cluster,
        "-y",
        "--timeout",
        "1200",
        "--envs",
        NODE_ENVS,
    ] + (["--secret", f"VLLM_API_KEY={KEY}"] if engine == "vllm" else [])


def llm_atc_round(env: dict, model: Path, region: str, cluster: str, port: int, engine: str) -> float:
    start = time.monotonic()
    run(serve_args(model, region, cluster, port, engine), env)
    first_token(f"http://127.0.0.1:{port}/v1", model.name, api_key=KEY)
    return time.monotonic() - start


def bare_round(env: dict, task_yaml: Path, model_name: str, cluster: str, port: int) -> float:
    start = time.monotonic()
    command = task_yaml.with_suffix(".command").read_text().replace("--port 8000", f"--port {port}")
    run(
        [
            str(BIN / "sky"),
            "launch",
            "-y",
            "-d",
            "-c",
            cluster,
            str(task_yaml),
            "--env",
            f"PORT={port}",
            "--env",
            f"VLLM_COMMAND={command}",
            "--secret",
            f"VLLM_API_KEY={KEY}",
        ],
        env,
    )
    wait_health(port, timeout=900)
    first_token(f"http://127.0.0.1:{port}/v1", model_name, api_key=KEY)
    return time.monotonic() - start


def slurm_setup(prefix: str) -> tuple[Path, str, dict]:
    """A work folder, the local Slurm cluster's name, and an environment with a HOME of its own that SkyPilot
    finds the cluster in (and its own API server port)."""
    real_config = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".slurm" / "config"
    if not real_config.is_file():
        sys.exit("no ~/.slurm/config: run `sudo bash scripts/slurm-up.sh` first")
    region = next(line.split()[1] for line in real_config.read_text().splitlines() if line.startswith("Host "))
    # `timeout` (or a Ctrl-C'ed shell) sends SIGTERM: end through the callers' finally blocks, which tear down
    # what they launched and stop the API server (killed, it would leave its executors behind).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work = Path(tempfile.mkdtemp(prefix=prefix))
    home = work / "home"
    (home / ".slurm").mkdir(parents=True)
    shutil.copy(real_config, home / ".slurm" / "config")
    env = dict(
        os.environ,
        HOME=str(home),
        LLM_ATC_HOME=str(work / "llm_atc"),
        SKYPILOT_DISABLE_USAGE_COLLECTION="1",
        SKYPILOT_API_SERVER_LOCAL_PORT=str(free_port()),
    )
    return work, region, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--engine", choices=("vllm", "transformers"), default="vllm")
    options = parser.parse_args()

    work, region, env = slurm_setup("llm-atc-bench-")
    model = build_tiny_model(work / "tiny-model")
    clusters: list[str] = []
    try:
        run([str(BIN / "sky"), "status"], env)  # start the API server outside the timings
        results = {"llm-atc": [], "bare sky launch": []}
        task_yaml = work / "task.yaml"
        rendered = subprocess.run(
            [*serve_args(model, region, "bench-bare", 8000, options.engine), "--dryrun"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        task_yaml.write_text(rendered)
        import yaml

        task_yaml.with_suffix(".command").write_text(yaml.safe_load(rendered)["envs"].get("VLLM_COMMAND", ""))
        for n in range(options.rounds):
            cluster = f"bench-bare-{n}"
            clusters.append(cluster)
            results["bare sky launch"].append(bare_round(env, task_yaml, model.name, cluster, free_port()))
            run([str(BIN / "sky"), "down", "-y", cluster], env)
            cluster = f"bench-atc-{n}"
            clusters.append(cluster)
            results["llm-atc"].append(llm_atc_round(env, model, region, cluster, free_port(), options.engine))
            run([str(BIN / "llm-atc"), "down", cluster, "-y"], env)
            print(
                f"round {n + 1}: llm-atc {results['llm-atc'][-1]:.1f}s, bare {results['bare sky launch'][-1]:.1f}s",
                flush=True,
            )
        for label, pick in (("best", min), ("median", statistics.median)):
            ours, bare = pick(results["llm-atc"]), pick(results["bare sky launch"])
            print(
                f"{label} of {options.rounds}: llm-atc serve -> first token {ours:.1f}s, "
                f"sky launch + /health -> first token {bare:.1f}s, ratio {ours / bare:.2f} (target <= 1.1)"
            )
    finally:
        for cluster in clusters:
            subprocess.run([str(BIN / "sky"), "down", "-y", cluster], env=env, capture_output=True)
        subprocess.run([str(BIN / "sky"), "api", "stop"], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
