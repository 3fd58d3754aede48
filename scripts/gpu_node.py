"""Resolve what the vLLM recipe installs on a GPU node and write the facts the recipe and docs use.

    .venv/bin/python scripts/gpu_node.py > llm_atc/data/gpu-node.json

The engine set (vLLM's CUDA build, Run:ai's model streamer and, for several models, vLLM's router, at the
versions recipes/serve/vllm.yaml pins) is resolved with ``uv pip compile`` for a Linux x86_64 node against
the public package index, with this machine's own pip settings (find-links, local indexes, constraints)
left out: the node sees only the index. It prints torch and the CUDA runtime it pulls, the NVIDIA driver
that runtime needs, the oldest glibc the set installs on, and the Python versions it resolves for.
Exit status 3 when the index cannot be reached (and nothing else went wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm_atc.gpu_node import MIN_DRIVER, REMOVED_AFTER_INSTALL  # noqa: E402
from llm_atc.recipes_catalog import get_recipe  # noqa: E402

INDEX = "https://pypi.org/simple"
ARCH = "x86_64"
GLIBCS = ("2_35", "2_34", "2_31", "2_28", "2_17")  # newest first: Ubuntu 22.04, RHEL 9, Ubuntu 20.04, RHEL 8, EL7
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
UNREACHABLE = 3


class IndexUnreachable(Exception):
    """The package index did not answer."""


def engine_set() -> list[str]:
    """What the recipe installs on a GPU node, at the recipe's pins."""
    envs = get_recipe("serve/vllm").load()["envs"]
    return [
        f"vllm=={envs['VLLM_VERSION']}",
        f"runai-model-streamer[s3,gcs]=={envs['RUNAI_STREAMER_VERSION']}",
        f"vllm-router=={envs['VLLM_ROUTER_VERSION']}",
    ]


def uv() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(found).is_file():
        sys.exit("uv is not installed: pip install -e '.[dev]' installs it")
    return found


def resolve(requirements: list[str], *, glibc: str, python: str, folder: str) -> dict[str, str] | None:
    """{package: version} for a node of that glibc and Python; None when the set has no solution there.
    ``folder``: uv's home and cache for this run (shared by its resolutions)."""
    wanted = Path(folder) / "engine.in"
    wanted.write_text("\n".join(requirements) + "\n")
    done = subprocess.run(
        [uv(), "pip", "compile", "--no-config", "--no-header", "--no-annotate", "--quiet",
         "--python-platform", f"{ARCH}-manylinux_{glibc}", "--python-version", python,
         "--index-url", INDEX, str(wanted)],
        capture_output=True, text=True, timeout=300, env=_without_local_settings(folder),
    )  # fmt: skip
    if done.returncode == 0:
        pins = (line.split("==", 1) for line in done.stdout.splitlines() if "==" in line)
        return {name.strip().lower(): version.strip() for name, version in pins}
    if "No solution found" in done.stderr:
        return None
    if re.search(r"Failed to fetch|error sending request|dns|connect|timed out", done.stderr, re.IGNORECASE):
        raise IndexUnreachable(done.stderr.strip().splitlines()[-1])
    raise RuntimeError(f"uv pip compile failed: {done.stderr.strip()[-2000:]}")


def _without_local_settings(home: str) -> dict[str, str]:
    """This environment without pip's and uv's own settings (the machine's wheel folders and indexes), and a
    fresh home (no user config); proxies and CA certificates stay: they are how the index is reached."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_", "XDG_CONFIG"))}
    return {**kept, "HOME": home, "UV_CACHE_DIR": str(Path(home) / "uv-cache")}


def download_bytes(pins: dict[str, str], *, glibc: str, python: str) -> int:
    """What installing ``pins`` downloads on such a node: for each package, the size of the file the index offers
    that an installer would pick for it (the most specific compatible wheel, else the sdist)."""
    from concurrent.futures import ThreadPoolExecutor

    from packaging import tags
    from packaging.utils import parse_wheel_filename

    version = tuple(int(p) for p in python.split("."))
    newest = int(glibc.split("_")[1])
    platforms = [f"manylinux_2_{minor}_{ARCH}" for minor in range(newest, 16, -1)] + [f"linux_{ARCH}"]
    ranked = [*tags.cpython_tags(version, platforms=platforms), *tags.compatible_tags(version, platforms=platforms)]
    rank = {tag: i for i, tag in enumerate(ranked)}

    def size(name: str, pinned: str) -> int:
        request = urllib.request.Request(f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            files = json.load(answer)["files"]
        best = None
        for file in files:
            if not file["filename"].endswith(".whl") or f"-{pinned}-" not in file["filename"]:
                continue  # (also skips the odd names of very old releases)
            _, found, _, wheel_tags = parse_wheel_filename(file["filename"])
            score = min((rank[t] for t in wheel_tags if t in rank), default=None)
            if str(found) == pinned and score is not None and (best is None or score < best[0]):
                best = (score, file["size"])
        if best is None:
            sdists = [f["size"] for f in files if f["filename"].endswith(".tar.gz") and f"-{pinned}." in f["filename"]]
            return sdists[0] if sdists else 0
        return best[1]

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(lambda item: size(*item), pins.items()))


def family(torch: str) -> dict[str, str]:
    """The torchvision and torchaudio releases built for a torch release (2.13.x: 0.28.x and 2.13.x)."""
    major, minor = (int(p) for p in torch.split(".")[:2])
    return {"torchvision": f"0.{minor + 15}", "torchaudio": f"{major}.{minor}"}


def facts(folder: str) -> dict:
    requirements = engine_set()
    target = resolve(requirements, glibc=GLIBCS[0], python="3.11", folder=folder)
    if target is None:
        raise RuntimeError(f"{' '.join(requirements)} has no solution for {ARCH}-manylinux_{GLIBCS[0]}")
    oldest = GLIBCS[0]
    for glibc in GLIBCS[1:]:
        if resolve(requirements, glibc=glibc, python="3.11", folder=folder) is None:
            break
        oldest = glibc
    pythons = [python for python in PYTHONS if resolve(requirements, glibc=GLIBCS[0], python=python, folder=folder)]
    runtime = target["nvidia-cuda-runtime"] if "nvidia-cuda-runtime" in target else target["nvidia-cuda-runtime-cu12"]
    cuda = ".".join(runtime.split(".")[:2])
    torch = target["torch"]
    kept = {name: target[name] for name in ("torchvision", "torchaudio") if name in target}
    kept = {name: version for name, version in kept.items() if name not in REMOVED_AFTER_INSTALL}
    mismatched = {name: v for name, v in kept.items() if not v.startswith(family(torch)[name] + ".")}
    if mismatched:
        raise RuntimeError(f"torch {torch} resolved with {mismatched}, which are not built for it")
    return {
        "engine_set": requirements,
        "platform": f"{ARCH}-manylinux_{GLIBCS[0]}",
        "index": INDEX,
        "torch": torch,
        **kept,
        "removed_after_install": {name: target[name] for name in REMOVED_AFTER_INSTALL if name in target},
        "cuda_runtime": runtime,
        "cuda": cuda,
        "min_driver": MIN_DRIVER[int(cuda.split(".")[0])],
        "min_glibc": oldest.replace("_", "."),
        "pythons": pythons,
        "packages": len(target),
        "download_gb": round(download_bytes(target, glibc=GLIBCS[0], python="3.11") / 1e9, 1),
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    try:
        with tempfile.TemporaryDirectory() as folder:
            data = facts(folder)
    except IndexUnreachable as exc:
        print(f"the package index {INDEX} cannot be reached: {exc}", file=sys.stderr)
        sys.exit(UNREACHABLE)
    sys.stdout.write(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
