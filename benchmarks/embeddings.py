"""Embeddings per second: llm-atc's local vLLM deployment against infinity-emb (a dedicated embedding server, what a
RAG user would otherwise run) over HTTP, and sentence-transformers in-process as the floor with no server at all.

Same tiny BERT (llm_atc.demo.build_tiny_encoder), same texts, same client concurrency, one run. Each server is
warmed up first, then sent every text once with ``--concurrency`` requests in flight (asyncio + httpx): once one
text a request, once ``--batch`` texts a request; the figure is texts embedded per second of wall time.
sentence-transformers encodes the same texts in batches of ``--batch`` in its own process. infinity-emb and
sentence-transformers get environments of their own (their pins differ from llm-atc's and vLLM's), made under
``--envs`` on first use.

    python benchmarks/embeddings.py [--texts 1000] [--concurrency 8] [--batch 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llm_atc.demo import build_tiny_encoder

BIN = Path(sys.executable).parent
INFINITY = ["infinity-emb[server,torch]==0.0.78", "torch==2.13.0"]
SENTENCE_TRANSFORMERS = ["sentence-transformers==6.2.0", "torch==2.13.0"]
WORDS = "model serve cloud token vector query answer train data cluster engine batch latency price".split()


def texts(count: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) for _ in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(root: Path, name: str, packages: list[str]) -> Path:
    """A virtualenv of its own with ``packages`` (made once; pip takes torch from this machine's wheels)."""
    folder = root / name
    if not (folder / ".complete").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        print(f"installing {' '.join(packages)} into {folder} ...", file=sys.stderr, flush=True)
        subprocess.run([str(folder / "bin" / "pip"), "install", "-q", *packages], check=True)
        (folder / ".complete").write_text(" ".join(packages))
    return folder


async def _embed_all(url: str, model: str, items: list[str], concurrency: int, headers: dict, per: int) -> float:
    """Seconds to embed every item, ``per`` texts a request, ``concurrency`` requests in flight."""
    queue: asyncio.Queue = asyncio.Queue()
    for start in range(0, len(items), per):
        queue.put_nowait(items[start : start + per])

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            chunk = queue.get_nowait()
            answer = await client.post(url, json={"model": model, "input": chunk}, headers=headers)
            answer.raise_for_status()
            assert len(answer.json()["data"]) == len(chunk)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - start


def over_http(url: str, model: str, items: list[str], concurrency: int, batch: int, headers: dict | None = None):
    """Embeddings per second over HTTP, one text a request and ``batch`` texts a request, after a warm-up."""
    asyncio.run(_embed_all(url, model, items[:50], concurrency, headers or {}, 1))
    return tuple(
        len(items) / asyncio.run(_embed_all(url, model, items, concurrency, headers or {}, per)) for per in (1, batch)
    )


def wait_http(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not answer within {timeout:.0f}s")


def llm_atc_vllm(model: Path, items: list[str], concurrency: int, batch: int, work: Path) -> tuple:
    key = "embeddings-bench"
    env = {**os.environ, "LLM_ATC_HOME": str(work / ".llm_atc"), "HF_HUB_OFFLINE": "1"}
    env.setdefault("LLM_ATC_ENGINES", str(Path.home() / ".llm_atc" / "engines"))
    serve = [str(BIN / "llm-atc"), "serve", "--name", str(model), "--cloud", "local", "--port", "0", "-c", "embed"]
    serve += ["--secret", f"VLLM_API_KEY={key}", "--envs", "VLLM_CPU_KVCACHE_SPACE=1"]
    done = subprocess.run(serve, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    try:
        base = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("Endpoint: "))
        headers = {"Authorization": f"Bearer {key}"}
        return over_http(f"{base}/embeddings", str(model), items, concurrency, batch, headers)
    finally:
        subprocess.run([str(BIN / "llm-atc"), "stop", "embed"], env=env, capture_output=True)


def infinity(model: Path, items: list[str], concurrency: int, batch: int, envs: Path, work: Path) -> tuple:
    folder = environment(envs, "infinity-emb", INFINITY)
    port = free_port()
    args = [str(folder / "bin" / "infinity_emb"), "v2", "--model-id", str(model), "--served-model-name", "tiny"]
    args += [
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--engine",
        "torch",
        "--device",
        "cpu",
        "--no-bettertransformer",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    with (work / "infinity.log").open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process)
        return over_http(f"http://127.0.0.1:{port}/embeddings", "tiny", items, concurrency, batch)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)


IN_PROCESS = """
import json, sys, time
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")
items = json.load(open(sys.argv[2]))
model.encode(items[:50], batch_size=int(sys.argv[3]))
start = time.perf_counter()
vectors = model.encode(items, batch_size=int(sys.argv[3]))
assert len(vectors) == len(items)
print(len(items) / (time.perf_counter() - start))
"""


def sentence_transformers(model: Path, items: list[str], batch: int, envs: Path, work: Path) -> float:
    folder = environment(envs, "sentence-transformers", SENTENCE_TRANSFORMERS)
    data = work / "texts.json"
    data.write_text(json.dumps(items))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [str(folder / "bin" / "python"), "-c", IN_PROCESS, str(model), str(data), str(batch)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="sentence-transformers' batch size")
    parser.add_argument("--envs", type=Path, default=Path.home() / ".cache" / "llm-atc-bench-envs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm-atc-bench-embed-"))
    model = build_tiny_encoder(work / "tiny-bert")
    # infinity-emb 0.0.78 pins transformers 4.x, which does not know the tokenizer class 5.x writes; the tokenizer
    # itself (tokenizer.json) is the same for every reader.
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    items = texts(args.texts)
    results = {
        "llm-atc (vLLM CPU build, HTTP)": llm_atc_vllm(model, items, args.concurrency, args.batch, work),
        "infinity-emb 0.0.78 (torch, HTTP)": infinity(model, items, args.concurrency, args.batch, args.envs, work),
    }
    floor = sentence_transformers(model, items, args.batch, args.envs, work)
    setup = {
        "texts": args.texts,
        "concurrency": args.concurrency,
        "batch": args.batch,
        "model": "tiny BERT (128 hidden)",
    }
    if args.json:
        rates = {name: {"one_text_per_request": one, f"{args.batch}_texts_per_request": many} for name, (one, many) in
                 results.items()}  # fmt: skip
        rates["sentence-transformers 6.2.0 (in-process)"] = {f"batches_of_{args.batch}": floor}
        print(json.dumps({"setup": setup, "embeddings_per_second": rates}, indent=1))
        return
    print(f"{args.texts} texts, {args.concurrency} requests in flight; embeddings per second:")
    print(f"  {'':42s} {'1 text/request':>15s} {f'{args.batch} texts/request':>16s}")
    for name, (one, many) in results.items():
        print(f"  {name:42s} {one:15.1f} {many:16.1f}")
    print(f"  {'sentence-transformers 6.2.0 (in-process)':42s} {'':15s} {floor:16.1f}")


if __name__ == "__main__":
    main()
