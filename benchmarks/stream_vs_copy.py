"""Cold start from a bucket: `llm-atc serve llm-atc/<run>` with the weights streamed into vLLM
(`--weights stream`, Run:ai's model streamer) against copied to disk first (`--weights copy`), in the
same run, from the same S3 bucket on 127.0.0.1: moto_server (the test suite's S3), or s3rver, an S3 server
on Node.js that answers ranged reads from its files as a real store does (moto serves each range from
Python, far slower than one whole-object read, which is not what S3 does):
    npm install --prefix /tmp/s3rver s3rver@3.7.1
    .venv/bin/python benchmarks/stream_vs_copy.py --store s3rver --s3rver /tmp/s3rver/node_modules/.bin/s3rver

Each is timed from the command's start to the first streamed chat token, with vLLM's CPU build from
`llm-atc engines install vllm`, for the tiny model and a bigger one (random weights, bfloat16, built
offline). The copy's download cache is emptied before each copied round, so every round starts from
the bucket. A first round of each warms vLLM's compile cache and is not counted; then the two
alternate. Target: streamed median <= copied median. Run:
    .venv/bin/python benchmarks/stream_vs_copy.py [--runs 3] [--sizes tiny,big] [--layers 16 --hidden 2048]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from local_ready import first_token, free_port, medians, serve_local  # this folder is on sys.path

from llm_atc.demo import build_tiny_model

BIN = Path(sys.executable).parent
BUCKET = "bench-weights"
# Seconds between two serves: without a pause the second of a pair started ~10-20 s slower on this
# 2-vCPU machine whichever way it loaded (the first runs of this script, with no pause, showed it).
SETTLE = 20


def serve(run: str, weights: str, env: dict, round_: int) -> float:
    """Seconds from `llm-atc serve` to the first token of ``llm-atc/<run>``, weights ``stream`` or ``copy``."""
    cluster = f"bench-{weights}-{round_}"
    if weights == "copy":
        shutil.rmtree(Path(env["LLM_ATC_HOME"]) / "cache", ignore_errors=True)
    start = time.monotonic()
    base_url = serve_local(
        f"llm-atc/{run}",
        cluster,
        env,
        "--source",
        f"s3://{BUCKET}/llm-atc/{run}",
        "--weights",
        weights,
        "--envs",
        f"AWS_ENDPOINT_URL={env['AWS_ENDPOINT_URL']}",
        "--timeout",
        "1200",
    )
    first_token(base_url, f"llm-atc/{run}", timeout=1200)
    took = time.monotonic() - start
    subprocess.run([str(BIN / "llm-atc"), "stop", cluster], env=env, check=True, capture_output=True)
    time.sleep(SETTLE)  # the engine that just stopped frees its memory before the next one starts
    return took


def upload(folder: Path, run: str, env: dict) -> int:
    """Put ``folder`` in the bucket as ``llm-atc/<run>/``; its size in bytes."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    total = 0
    for path in sorted(folder.iterdir()):
        s3.upload_file(str(path), BUCKET, f"llm-atc/{run}/{path.name}")
        total += path.stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=16, help="layers of the bigger model")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size of the bigger model")
    parser.add_argument("--sizes", default="tiny,big", help="which models to time: tiny, big or both")
    parser.add_argument("--store", choices=("moto", "s3rver"), default="moto", help="the S3 server on 127.0.0.1")
    parser.add_argument("--s3rver", default="s3rver", help="the s3rver program (npm install s3rver)")
    args = parser.parse_args()
    from llm_atc import engines

    engine = engines.require("vllm", why="this benchmark")
    work = Path(tempfile.mkdtemp(prefix="llm-atc-bench-"))
    port = free_port()
    if args.store == "moto":
        server, key = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], "bench"
    else:  # files under the work folder; s3rver's own fixed credentials
        (work / "s3rver").mkdir()
        server = [args.s3rver, "-d", str(work / "s3rver"), "-a", "127.0.0.1", "-p", str(port), "--no-vhost-buckets"]
        key = "S3RVER"
    store = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {
        **os.environ,
        "HOME": str(work),
        "LLM_ATC_HOME": str(work / ".llm_atc"),
        "LLM_ATC_ENGINES": str(engine.path.parent),
        "HF_HUB_OFFLINE": "1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        time.sleep(3)
        import boto3

        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        builders = {
            "tiny": lambda: build_tiny_model(work / "tiny"),
            "big": lambda: build_tiny_model(work / "big", layers=args.layers, hidden_size=args.hidden),
        }
        models = {size: builders[size]() for size in args.sizes.split(",")}
        for run, folder in models.items():
            size = upload(folder, run, env)
            serve(run, "stream", env, 0)  # warms vLLM's compile cache for this model's shapes
            serve(run, "copy", env, 0)
            times: dict[str, list[float]] = {"stream": [], "copy": []}
            for round_ in range(1, args.runs + 1):
                for weights in ("copy", "stream") if round_ % 2 else ("stream", "copy"):
                    times[weights].append(serve(run, weights, env, round_))
                print(
                    f"{run} round {round_}: streamed {times['stream'][-1]:.2f}s, copied {times['copy'][-1]:.2f}s",
                    flush=True,
                )
            streamed, copied = statistics.median(times["stream"]), statistics.median(times["copy"])
            print(f"{run} ({size / 2**20:.0f} MiB of safetensors, {args.store}):")
            print(medians("  --weights copy -> first token", times["copy"]))
            print(medians("  --weights stream -> first token", times["stream"]))
            print(f"  streamed / copied {streamed / copied:.2f}  (target <= 1.00; {copied - streamed:+.2f} s)")
    finally:
        store.terminate()
        store.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
