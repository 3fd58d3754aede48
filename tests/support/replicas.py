"""A service replica's side of runtime adapters, beside the session's real vLLM server."""

from __future__ import annotations

from conftest import unique


def wait_for(predicate, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def replica_follower(live, manifest: str, work, moto_endpoint):
    """What each replica of a service runs beside its engine (recipes/serve/vllm.yaml): the manifest follower,
    here beside the session's real vLLM server."""
    import os
    import subprocess
    import sys

    from llm_atc.recipes_catalog import recipes_dir

    env = {
        **os.environ,
        "VLLM_API_KEY": live.api_key,
        "LLM_ATC_ADAPTERS_POLL": "0.5",
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    script = recipes_dir() / "train" / "buckets.py"
    engine = live.base_url.removesuffix("/v1")
    log = (work / f"replica-{unique('log')}.log").open("w")
    return subprocess.Popen(
        [sys.executable, str(script), "adapters", manifest, engine, str(work / "node-adapters")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
