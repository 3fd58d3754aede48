"""CLI start-up: `llm-atc --help` against `sky --help`, and `llm-atc serve --dryrun`.

Targets: --help <= 0.3 s and <= 0.1x `sky --help`; --dryrun <= 3 s. Run:
    python benchmarks/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def wall(args: list[str], env: dict, runs: int) -> float:
    """Median wall time of ``args`` over ``runs`` runs (after one warm-up)."""
    subprocess.run(args, env=env, capture_output=True, check=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(args, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    home = tempfile.mkdtemp(prefix="llm-atc-bench-")
    env = {**os.environ, "HOME": home, "LLM_ATC_HOME": f"{home}/.llm_atc", "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    ours = wall([str(BIN / "llm-atc"), "--help"], env, runs)
    sky = wall([str(BIN / "sky"), "--help"], env, runs)
    dry = wall(
        [
            str(BIN / "llm-atc"),
            "serve",
            "--name",
            "lmsys/vicuna-13b-v1.3",
            "--accelerator",
            "A100-80GB:2",
            "--cloud",
            "gcp",
            "--dryrun",
        ],
        env,
        runs,
    )
    print(f"llm-atc --help      {ours:6.3f} s   (target <= 0.300 s)")
    print(f"sky --help          {sky:6.3f} s")
    print(f"ratio               {ours / sky:6.3f}     (target <= 0.100)")
    print(f"serve --dryrun      {dry:6.3f} s   (target <= 3.000 s)")


if __name__ == "__main__":
    main()
