"""What `llm-atc eval` costs and what `llm-atc promote` does to the requests in flight, in the same run.

Two LoRA runs of `llm-atc train` on synthetic chats (a word -> a fixed answer; the other run on shuffled answers),
400 chats each with --eval_fraction 0.5 (about 200 held out); the tiny model (built offline) served here by
vLLM's CPU build (`llm-atc engines install vllm`):

* eval cost: wall time and requests to score the base on the good run's ~200 held-out chats, token by token on a
  deployment with runtime LoRA on (the only way vLLM's CPU build scores with LoRA on), and from prompt
  log-probabilities on one started with --max_loras 0 (the way GPU deployments are scored);
* the switch: the noise run is promoted as `chat` first (--force), then a client calls model=chat in a loop
  (CLIENTS threads) while the good run is promoted over it: failed requests, the longest interval without a
  successful answer, and the p99 latency during the promote against the same client before it. Goal: no failed
  request. Run:
    .venv/bin/python benchmarks/eval_promote.py [--clients 2] [--before 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from local_ready import llm_atc, serve_local  # this folder is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.chats import KEYS, mapping_chats, write_jsonl

from llm_atc.demo import build_tiny_model

BIN = Path(sys.executable).parent
LEARN = "MERGE=0 MAX_SEQ_LEN=64 BATCH_SIZE=8 EPOCHS=12 LR=5e-3 LORA_R=8"


class Client(threading.Thread):
    """Calls model=NAME in a loop: (start, end, ok) of every request."""

    def __init__(self, base_url: str, name: str):
        super().__init__(daemon=True)
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        self.name, self.calls, self.stopping = name, [], threading.Event()

    def run(self):
        i = 0
        while not self.stopping.is_set():
            start = time.monotonic()
            try:
                self.client.chat.completions.create(
                    model=self.name, max_tokens=2, temperature=0,
                    messages=[{"role": "user", "content": f"item {i}: {KEYS[i % len(KEYS)]}"}],
                )  # fmt: skip
                ok = True
            except Exception:  # counted: a failed request is what this measures
                ok = False
            self.calls.append((start, time.monotonic(), ok))
            i += 1


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--before", type=float, default=10, help="seconds of load measured before the promote")
    options = parser.parse_args()
    from llm_atc import engines

    engine = engines.require("vllm", why="this benchmark")
    work = Path(tempfile.mkdtemp(prefix="llm-atc-bench-"))
    env = {**os.environ, "HOME": str(work), "LLM_ATC_HOME": str(work / ".llm_atc"), "HF_HUB_OFFLINE": "1",
           "LLM_ATC_ENGINES": str(engine.path.parent)}  # fmt: skip
    model = build_tiny_model(work / "tiny")
    for run, shuffled in (("good", False), ("noise", True)):
        data = write_jsonl(work / f"{run}.jsonl", mapping_chats(400, shuffled=shuffled))
        llm_atc("train", "--model_type", "lora", "--finetune_data", str(data), "--base_model", str(model),
                "--cloud", "local", "--name", run, "--eval_fraction", "0.5", "--envs", LEARN, env=env)  # fmt: skip
    figures: dict = {}
    try:
        for cluster, extra, how in (("bench-ev-lora", (), "--per_token"),
                                    ("bench-ev-plain", ("--max_loras", "0"), "--prompt_logprobs")):  # fmt: skip
            serve_local(str(model), cluster, env, "--vllm_args", "--enforce-eager", *extra)
            start = time.monotonic()
            result = json.loads(llm_atc("eval", cluster, "--run", "llm-atc/good", "--model", str(model), how,
                                        "--json", env=env))  # fmt: skip
            figures[how.strip("-")] = {"seconds": round(time.monotonic() - start, 2), "requests": result["requests"],
                                       "chats": result["scores"][str(model)]["chats"],
                                       "tokens": result["scores"][str(model)]["tokens"]}  # fmt: skip
            if cluster == "bench-ev-plain":
                llm_atc("stop", cluster, env=env)
        cluster = "bench-ev-lora"
        base_url = llm_atc("endpoint", cluster, env=env).strip().removesuffix("/v1")
        llm_atc("promote", "llm-atc/noise", "--on", cluster, "--as", "chat", "--force", env=env)
        clients = [Client(base_url, "chat") for _ in range(options.clients)]
        for client in clients:
            client.start()
        time.sleep(options.before)
        switch_start = time.monotonic()
        llm_atc("promote", "llm-atc/good", "--on", cluster, "--as", "chat", env=env)
        switch_end = time.monotonic()
        time.sleep(2)
        for client in clients:
            client.stopping.set()
            client.join(60)
    finally:
        for name in ("bench-ev-lora", "bench-ev-plain"):
            subprocess.run([str(BIN / "llm-atc"), "stop", name], env=env, capture_output=True)
    calls = sorted(call for client in clients for call in client.calls)
    before = [end - start for start, end, ok in calls if ok and end < switch_start]
    during = [end - start for start, end, ok in calls if ok and start >= switch_start and end <= switch_end]
    answered = [end for _, end, ok in calls if ok]
    gap = max(b - a for a, b in zip(answered, answered[1:], strict=False)) if len(answered) > 1 else float("inf")
    figures["switch"] = {
        "requests": len(calls),
        "failed": sum(not ok for *_, ok in calls),
        "promote_seconds": round(switch_end - switch_start, 2),
        "longest_gap_seconds": round(gap, 3),
        "p99_before_ms": round(p99(before) * 1000, 1),
        "p99_during_ms": round(p99(during) * 1000, 1),
        "requests_during": len(during),
    }
    for how in ("per_token", "prompt_logprobs"):
        f = figures[how]
        print(
            f"eval, {how:<16} {f['chats']} chats, {f['tokens']} tokens: {f['seconds']:.2f} s, {f['requests']} requests"
        )
    s = figures["switch"]
    print(f"promote with {options.clients} clients calling model=chat: {s['requests']} requests, {s['failed']} failed "
          f"(goal 0); longest interval without an answer {s['longest_gap_seconds']:.3f} s; p99 {s['p99_before_ms']} ms "
          f"before vs {s['p99_during_ms']} ms during the {s['promote_seconds']} s promote")  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
