"""Parsing and validation of user-supplied option values.

Everything here is pure Python (no SkyPilot import) so that errors are fast and
every bad input becomes a one-line :class:`UserError`.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from dataclasses import dataclass

from llm_atc.errors import UserError

# The ranges every numeric option is checked against (docs/cli.md lists them).
LIMITS = {
    "--timeout": (1, 86_400, "seconds"),
    "--target_qps": (0.001, 1_000_000, "requests per second per replica"),
    "--disk_size": (1, 65_536, "GB"),
    "--max_model_len": (1, 10_485_760, "tokens"),
    "--num_nodes": (1, 512, "nodes"),
    "--replicas": (0, 1_000, "replicas"),
    "GPUS_PER_NODE": (1, 64, "GPUs per node"),
    "--cpus": (0.001, 1_024, "vCPUs"),
    "--memory": (0.001, 65_536, "GB"),
    "--max_loras": (0, 256, "adapters"),
    # A deployment ends by itself: after this long without a request, or this long in all.
    "--idle_minutes": (0.5, 10_080, "minutes"),
    "--max_hours": (0.01, 8_760, "hours"),
    "--price_per_hour": (0, 10_000, "dollars per hour"),
    # A run holds this share of its conversations out of training; eval and promote score models on them.
    "--eval_fraction": (0, 0.5, "conversations held out (a share)"),
    # promote: how much lower (nats per token) the candidate's held-out loss must be, all of its 95% interval.
    "--min_gain": (0, 100, "nats per token"),
}


def plain_number(value: float) -> str:
    """1000000 -> "1000000", 0.001 -> "0.001" (no exponents in messages)."""
    return str(int(value)) if float(value).is_integer() else f"{value:f}".rstrip("0")


def check_number(value, option: str, *, limit: str | None = None):
    """``value`` (None passes) when it is a finite number within ``option``'s range, else a one-line error."""
    import math

    if value is None:
        return None
    low, high, unit = LIMITS[limit or option]
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        shown = value if isinstance(value, (int, float)) else shorten(str(value))
        raise UserError(
            f"{option} {shown}: give a number of {unit} between {plain_number(low)} and {plain_number(high)}"
        )
    return value


ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Names that are always secrets, plus suffixes that mark one; SECRET_RULE says it (--help, README, docs).
SECRET_NAMES = frozenset({"AWS_ACCESS_KEY_ID"})
SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD")
SECRET_RULE = (
    "AWS_ACCESS_KEY_ID and any name ending in _TOKEN, _KEY, _SECRET or _PASSWORD (HF_TOKEN, WANDB_API_KEY, ...)"
)


def is_secret_name(key: str) -> bool:
    """Whether an env var name holds a credential and must travel as a SkyPilot secret."""
    upper = key.upper()
    return upper in SECRET_NAMES or upper.endswith(SECRET_SUFFIXES)


def parse_env_pairs(values: tuple[str, ...] | list[str], *, option: str) -> dict[str, str]:
    """Parse ``--envs``/``--secret`` values.

    Each value may hold several space-separated items (shell quoting honoured):
    ``KEY=VAL`` or a bare ``KEY`` whose value is read from the local environment.
    """
    parsed: dict[str, str] = {}
    for raw in values:
        try:
            items = shlex.split(raw)
        except ValueError as exc:
            raise UserError(f"{option} {shorten(raw)}: {exc}") from None
        if not items:
            raise UserError(f"{option} needs KEY=VALUE or KEY, got an empty value")
        for item in items:
            key, sep, value = item.partition("=")
            if not ENV_KEY_RE.fullmatch(key):
                raise UserError(
                    f"{option} {shorten(item)}: {shorten(key)} is not a valid variable name "
                    "(letters, digits and _, not starting with a digit)"
                )
            if not sep:
                if key not in os.environ:
                    raise UserError(f"{option} {key}: no value given and {key} is not set in your environment")
                value = os.environ[key]
            parsed[key] = value
    return parsed


def split_envs_and_secrets(envs: dict[str, str], secrets: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Move credential-looking ``--envs`` into the secrets, which win on conflicts."""
    plain = {k: v for k, v in envs.items() if not is_secret_name(k)}
    moved = {k: v for k, v in envs.items() if is_secret_name(k)}
    return plain, {**moved, **secrets}


@dataclass(frozen=True)
class Accelerator:
    """One GPU type and count, e.g. ``A100-80GB:2``."""

    name: str
    count: int

    def __str__(self) -> str:
        return f"{self.name}:{self.count}"


def parse_accelerators(value: str, known: list[str] | None = None) -> tuple[Accelerator, ...]:
    """Parse ``NAME[:COUNT]`` or a comma list of them (any-of).

    ``known`` is the list of GPU names to check against; close matches are
    suggested for unknown names.
    """
    text = value.strip()
    if not text:
        raise UserError("--accelerator is empty; use NAME[:COUNT] such as A100:1 or A100-80GB:2")
    result = []
    for part in text.split(","):
        part = part.strip()
        name, sep, count_text = part.partition(":")
        name = name.strip()
        if not name:
            raise UserError(f"--accelerator {shorten(part)}: missing GPU name; use NAME[:COUNT] such as A100:1")
        if sep:
            if not count_text.strip().isdecimal():
                raise UserError(f"--accelerator {shorten(part)}: count {shorten(count_text)} is not a whole number")
            count = int(count_text)
            if count < 1:
                raise UserError(f"--accelerator {shorten(part)}: count must be at least 1")
            if count > LIMITS["GPUS_PER_NODE"][1]:
                raise UserError(f"--accelerator {shorten(part)}: at most {LIMITS['GPUS_PER_NODE'][1]} GPUs per node")
        else:
            count = 1
        if known is not None:
            name = canonical_gpu_name(name, known)
        result.append(Accelerator(name, count))
    if len({a.name for a in result}) != len(result):
        raise UserError(f"--accelerator {shorten(value)} names the same GPU twice")
    return tuple(result)


def canonical_gpu_name(name: str, known: list[str]) -> str:
    """Return the catalog spelling of ``name`` or fail with close matches."""
    by_lower = {k.lower(): k for k in known}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(by_lower[c] for c in close)}?" if close else ""
    raise UserError(f"--accelerator: unknown GPU {shorten(name)}{hint}")


def skypilot_infra() -> tuple[str, dict[str, str]]:
    """(SkyPilot version, the infra names it knows and their aliases), from data/skypilot-infra.json."""
    import json
    from importlib import resources

    data = json.loads(resources.files("llm_atc").joinpath("data/skypilot-infra.json").read_text())
    return data["skypilot"], {**{name: name for name in data["infra"]}, **data["aliases"]}


def canonical_infra(name: str) -> str:
    """``--cloud`` as SkyPilot spells it (aliases kept), or a one-line error with close matches."""
    return closest(name, sorted(skypilot_infra()[1]), "cloud")


def closest(value: str, choices: list[str], what: str) -> str:
    """Return ``value`` normalised to one of ``choices`` or fail with close matches."""
    by_lower = {c.lower(): c for c in choices}
    if value.lower() in by_lower:
        return by_lower[value.lower()]
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(by_lower[c] for c in close)}?" if close else ""
    raise UserError(f"unknown {what} {shorten(value)}{hint}")


def parse_extra_args(value: str | None, *, option: str) -> tuple[str, ...]:
    """Split an extra-flags string the way a shell would, without running one."""
    if not value:
        return ()
    try:
        return tuple(shlex.split(value))
    except ValueError as exc:
        raise UserError(f"{option} {shorten(value)}: {exc}") from None


CLUSTER_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_CLUSTER_NAME = 40


def cluster_name_for(model: str, prefix: str = "llm-atc") -> str:
    """Derive a valid cluster name from a model reference, e.g. ``llm-atc-vicuna-13b-v1-3``."""
    tail = model.rstrip("/").split("/")[-1].lower()
    slug = re.sub(r"[^a-z0-9]+", "-", tail).strip("-") or "model"
    name = slug if slug.startswith(f"{prefix}-") else f"{prefix}-{slug}"
    if len(name) > MAX_CLUSTER_NAME:
        import hashlib

        digest = hashlib.sha1(model.encode()).hexdigest()[:6]
        name = name[: MAX_CLUSTER_NAME - 7].rstrip("-") + "-" + digest
    return name


def is_cluster_name(name: str) -> bool:
    """Whether ``name`` could name a SkyPilot cluster."""
    return len(name) <= 63 and CLUSTER_NAME_RE.fullmatch(name) is not None


def check_cluster_name(name: str) -> str:
    """Validate a user-given ``--cluster`` name."""
    if not is_cluster_name(name):
        raise UserError(
            f"--cluster {shorten(name)} is not a valid cluster name: use lowercase letters, digits and "
            "'-', starting with a letter (at most 63 characters)"
        )
    return name


RESOURCE_AMOUNT_RE = re.compile(r"^(\d+(\.\d+)?)\+?$")


def check_resource_amount(value: str | None, *, option: str, unit: str) -> str | None:
    """A SkyPilot cpus/memory request: ``4`` (exactly) or ``4+`` (at least); None passes through."""
    if value is None:
        return None
    text = str(value).strip()
    match = RESOURCE_AMOUNT_RE.fullmatch(text)
    low, high, _ = LIMITS[option]
    if not match or not low <= float(match.group(1)) <= high:
        raise UserError(
            f"{option} {shorten(text)}: give a number of {unit} between {plain_number(low)} and {plain_number(high)}, "
            "e.g. 4 (exactly) or 4+ (at least)"
        )
    return text


def check_port(port: int) -> int:
    """A TCP port for an engine (0 means: pick a free one, local mode only)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port (0-65535)")
    return port


MAX_SHOWN = 80


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """User text for an error message: repr'd, and cut in the middle when long."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[: limit // 2]}...{shown[-(limit // 2) :]} ({len(text)} chars)"


def read_text_file(value: str, *, option: str, max_bytes: int) -> str:
    """The UTF-8 text of the regular file ``value``, at most ``max_bytes``; one-line errors otherwise."""
    import stat
    from pathlib import Path

    shown = shorten(value)
    path = Path(value).expanduser()
    try:
        info = path.stat()
    except FileNotFoundError:
        raise UserError(f"{option} {shown}: no such file") from None
    except OSError as exc:
        raise UserError(f"{option} {shown}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{option} {shown} is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{option} {shown} is not a regular file")
    if info.st_size > max_bytes:
        raise UserError(f"{option} {shown} is {info.st_size // 1024} KiB; at most {max_bytes // 1024} KiB is allowed")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{option} {shown}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{option} {shown} is not UTF-8 text (byte {exc.start})") from None
