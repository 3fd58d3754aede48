"""llm-atc's overhead on a real Slurm launch, against bare `sky launch` of the same task.

Both sides serve the tiny model (built offline) with the transformers recipe on the local
Slurm cluster (`sudo bash scripts/slurm-up.sh` first) and are timed, in the same run, from
the command's start to the first streamed chat token:

  llm-atc: `llm-atc serve --name <folder> --cloud slurm --engine transformers ...`, then a chat;
  bare:    `sky launch -d` of the task YAML llm-atc renders (`--dryrun`), a curl-style loop on
           /health, then the same chat.

Target: ratio <= 1.1. Run:  .venv/bin/python benchmarks/slurm_overhead.py [--rounds 1]
Uses a temporary HOME with its own SkyPilot API server port, and tears every cluster down.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tiny_model import build_tiny_model  # noqa: E402

from local_ready import free_port, wait_health  # noqa: E402  (this folder is on sys.path)

BIN = Path(sys.executable).parent
TORCH_ENVS = "TORCH_SPEC=torch==2.13.0+cpu UV_FIND_LINKS=/opt/wheels"


def first_token(base_url: str, model: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stream.close()
            return
    raise RuntimeError("no token streamed")


def run(args: list[str], env: dict) -> None:
    done = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def serve_args(model: Path, region: str, cluster: str, port: int) -> list[str]:
    return [str(BIN / "llm-atc"), "serve", "--name", str(model), "--cloud", "slurm", "--region", region,
            "--engine", "transformers", "--cpus", "1", "--port", str(port), "-c", cluster, "-y",
            "--envs", TORCH_ENVS]


def llm_atc_round(env: dict, model: Path, region: str, cluster: str, port: int) -> float:
    start = time.monotonic()
    run(serve_args(model, region, cluster, port), env)
    first_token(f"http://127.0.0.1:{port}/v1", model.name)
    return time.monotonic() - start


def bare_round(env: dict, task_yaml: Path, model_name: str, cluster: str, port: int) -> float:
    start = time.monotonic()
    run([str(BIN / "sky"), "launch", "-y", "-d", "-c", cluster, str(task_yaml), "--env", f"PORT={port}"], env)
    wait_health(port, timeout=900)
    first_token(f"http://127.0.0.1:{port}/v1", model_name)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    options = parser.parse_args()

    real_config = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".slurm" / "config"
    if not real_config.is_file():
        sys.exit("no ~/.slurm/config: run `sudo bash scripts/slurm-up.sh` first")
    region = next(line.split()[1] for line in real_config.read_text().splitlines() if line.startswith("Host "))
    work = Path(tempfile.mkdtemp(prefix="llm-atc-bench-"))
    home = work / "home"
    (home / ".slurm").mkdir(parents=True)
    shutil.copy(real_config, home / ".slurm" / "config")
    env = dict(os.environ, HOME=str(home), LLM_ATC_HOME=str(work / "llm_atc"), SKYPILOT_DISABLE_USAGE_COLLECTION="1",
               SKYPILOT_API_SERVER_LOCAL_PORT=str(free_port()))
    model = build_tiny_model(work / "tiny-model")
    clusters: list[str] = []
    try:
        run([str(BIN / "sky"), "status"], env)  # start the API server outside the timings
        results = {"llm-atc": [], "bare sky launch": []}
        task_yaml = work / "task.yaml"
        rendered = subprocess.run([*serve_args(model, region, "bench-bare", 8000), "--dryrun"], env=env,
                                  capture_output=True, text=True, check=True).stdout
        task_yaml.write_text(rendered)
        for n in range(options.rounds):
            cluster = f"bench-bare-{n}"
            clusters.append(cluster)
            results["bare sky launch"].append(bare_round(env, task_yaml, model.name, cluster, free_port()))
            run([str(BIN / "sky"), "down", "-y", cluster], env)
            cluster = f"bench-atc-{n}"
            clusters.append(cluster)
            results["llm-atc"].append(llm_atc_round(env, model, region, cluster, free_port()))
            run([str(BIN / "llm-atc"), "down", cluster, "-y"], env)
            print(f"round {n + 1}: llm-atc {results['llm-atc'][-1]:.1f}s, "
                  f"bare {results['bare sky launch'][-1]:.1f}s", flush=True)
        ours, bare = min(results["llm-atc"]), min(results["bare sky launch"])
        print(f"llm-atc serve -> first token:          {ours:.1f}s (best of {options.rounds})")
        print(f"sky launch + /health -> first token:  {bare:.1f}s (best of {options.rounds})")
        print(f"ratio: {ours / bare:.2f} (target <= 1.1)")
    finally:
        for cluster in clusters:
            subprocess.run([str(BIN / "sky"), "down", "-y", cluster], env=env, capture_output=True)
        subprocess.run([str(BIN / "sky"), "api", "stop"], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
