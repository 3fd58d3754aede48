"""Ends a deployment that nobody uses (``--idle_minutes``) or that has run its time (``--max_hours``), from the node.

    python3 llm_atc_watch.py --pid PID --metrics URL [--metrics URL ...] [--idle-minutes M] [--max-hours H]

Started by recipes/serve/vllm.yaml beside the engine (PID: the engine, or llm-atc's gateway in front of several).
Traffic is what the engines count themselves: their ``/metrics`` (Prometheus text, read with the deployment's key
from VLLM_API_KEY) give every HTTP request they served by path (``http_requests_total``; vLLM leaves out /health,
/metrics and the like, and this watcher also leaves out /v1/models, which asks nothing of the model) and the
requests running or waiting now. A deployment is idle while none of that moves. Time spent loading the model is
not idle time. When a limit is reached, the watcher prints one line (the reason llm-atc records) and sends the
engine SIGTERM: the job ends, and SkyPilot's autodown removes the cluster; here, the process group ends.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import ssl
import sys
import time
import urllib.request

IDLE_MARKER = "llm-atc: stopped: no request for"  # + " N minutes (--idle_minutes)"
TIME_MARKER = "llm-atc: stopped: time limit of"  # + " H hours reached (--max_hours)"
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s+([-+\d.eEinfa]+)")
_ASKS_NOTHING = ('handler="/v1/models"',)


def ended_by_limit(log_text: str) -> str | None:
    """Why the watcher ended the engine, from the engine's log (what llm-atc records): ``idle 30 min`` or
    ``8 hours up``; None when it did not."""
    for line in reversed(log_text.splitlines()):
        if IDLE_MARKER in line:
            return f"idle {line.split(IDLE_MARKER, 1)[1].split(' minutes', 1)[0].strip()} min"
        if TIME_MARKER in line:
            return f"{line.split(TIME_MARKER, 1)[1].split(' hours', 1)[0].strip()} hours up"
    return None


def log(message: str) -> None:
    print(message, flush=True)


def activity(text: str) -> tuple[float, float]:
    """(requests served so far, requests running or waiting now), from Prometheus text."""
    served = busy = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if name == "http_requests_total" and not any(skip in labels for skip in _ASKS_NOTHING):
            served += value
        elif name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            busy += value
    return served, busy


def read_metrics(url: str, key: str) -> str | None:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    context = ssl._create_unverified_context() if url.startswith("https://") else None  # this node's own engine
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.read().decode(errors="replace")
    except OSError:
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch(args) -> int:
    key = os.environ.get("VLLM_API_KEY", "")
    started = time.monotonic()
    last_seen: float | None = None  # total requests served, once the engines answer
    last_traffic = started
    while alive(args.pid):
        time.sleep(args.interval)
        now = time.monotonic()
        readings = [read_metrics(url, key) for url in args.metrics]
        if readings and all(text is not None for text in readings):
            served, busy = (sum(values) for values in zip(*(activity(text) for text in readings), strict=True))
            if last_seen is None or served != last_seen or busy > 0:
                last_traffic = now
            last_seen = served
        else:
            last_traffic = now  # loading, or restarting: not idle time
        if args.max_hours and now - started >= args.max_hours * 3600:
            reason = f"{TIME_MARKER} {args.max_hours:g} hours reached (--max_hours)"
        elif args.idle_minutes and last_seen is not None and now - last_traffic >= args.idle_minutes * 60:
            reason = f"{IDLE_MARKER} {args.idle_minutes:g} minutes (--idle_minutes)"
        else:
            continue
        log(f"{reason}; ending the engine")
        try:
            os.kill(args.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        return 0
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, required=True, help="the engine's (or the gateway's) process")
    parser.add_argument("--metrics", action="append", default=[], help="an engine's /metrics URL (none: time only)")
    parser.add_argument("--idle-minutes", type=float, default=0.0)
    parser.add_argument("--max-hours", type=float, default=0.0)
    parser.add_argument("--interval", type=float, default=float(os.environ.get("LLM_ATC_WATCH_INTERVAL", "10")))
    return watch(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
