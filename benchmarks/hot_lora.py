"""A new LoRA adapter on a live endpoint: `llm-atc adapters add` into the running vLLM (hot load)
against stopping the deployment and serving it again with `--lora` (restart), in the same run.

Both are timed from the first command's start to the adapter's first streamed chat token, on the
tiny model (built offline) with an adapter that `llm-atc train` trains first (LoRA, MERGE=0), with
vLLM's CPU build from `llm-atc engines install vllm`, locally. Target: hot / restart <= 0.1. Run:
    .venv/bin/python benchmarks/hot_lora.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from local_ready import first_token, llm_atc, medians, serve_local  # this folder is on sys.path

from llm_atc.demo import build_tiny_model

BIN = Path(sys.executable).parent
KEY = "bench-key"
CLUSTER = "bench-hot"


def serve(model: Path, env: dict, *extra: str) -> str:
    """The tiny model served here with an API key; its base URL."""
    return serve_local(str(model), CLUSTER, env, "--secret", f"VLLM_API_KEY={KEY}", *extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    from llm_atc import engines

    engine = engines.require("vllm", why="this benchmark")
    work = Path(tempfile.mkdtemp(prefix="llm-atc-bench-"))
    env = {
        **os.environ,
        "HOME": str(work),
        "LLM_ATC_HOME": str(work / ".llm_atc"),
        "HF_HUB_OFFLINE": "1",
        "LLM_ATC_ENGINES": str(engine.path.parent),
    }
    model = build_tiny_model(work / "tiny")
    data = work / "chats.json"
    chats = [
        {"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": "Hello"}]} for i in range(8)
    ]
    data.write_text(json.dumps(chats))
    run = "bench-adapter"
    llm_atc(
        "train",
        "--model_type",
        "lora",
        "--finetune_data",
        str(data),
        "--base_model",
        str(model),
        "--cloud",
        "local",
        "--name",
        run,
        "--envs",
        "MERGE=0 MAX_STEPS=2 MAX_SEQ_LEN=64 BATCH_SIZE=2",
        env=env,
    )
    base_url = serve(model, env)  # also warms vLLM's compile cache
    hot, restart = [], []
    try:
        for round_ in range(1, runs + 1):
            name = f"hot{round_}"
            start = time.monotonic()
            llm_atc("adapters", "add", CLUSTER, f"{name}=llm-atc/{run}", env=env)
            first_token(base_url, name, api_key=KEY)
            hot.append(time.monotonic() - start)
            llm_atc("adapters", "remove", CLUSTER, name, env=env)

            start = time.monotonic()
            llm_atc("stop", CLUSTER, env=env)
            base_url = serve(model, env, "--lora", f"{name}=llm-atc/{run}")
            first_token(base_url, name, api_key=KEY)
            restart.append(time.monotonic() - start)
            llm_atc("stop", CLUSTER, env=env)
            base_url = serve(model, env)
            print(f"round {round_}: hot load {hot[-1]:.2f}s, restart {restart[-1]:.2f}s", flush=True)
    finally:
        subprocess.run([str(BIN / "llm-atc"), "stop", CLUSTER], env=env, capture_output=True)
    print(medians("adapters add -> adapter's first token", hot))
    print(medians("stop + serve --lora -> first token", restart))
    print(f"hot / restart {statistics.median(hot) / statistics.median(restart):.3f}  (target <= 0.1)")


if __name__ == "__main__":
    main()
