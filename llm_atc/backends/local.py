"""``--cloud local``: the same serving recipe, run as a process group on this machine.

The recipe's ``run`` script is executed by bash with the rendered envs (setup is
skipped: the ``[local]`` extra installs what it needs). The engine binds
127.0.0.1, logs to ``$LLM_ATC_HOME/local/<cluster>/server.log`` and is recorded
with its pid, port and start time (to tell a reused pid from ours).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from llm_atc import ui
from llm_atc.backends._base import LiveState
from llm_atc.errors import LaunchError, NotFoundError, UserError
from llm_atc.readiness import EngineExited, wait_ready
from llm_atc.registry import Record, Registry, Status, home
from llm_atc import engines
from llm_atc.render import LocalRun, render_serve_task
from llm_atc.serving import write_chat_template
from llm_atc.spec import API_KEY_SECRET, ServeSpec
from llm_atc.storage import check_checkpoint, download_checkpoint, store_env

LOCAL_READY_TIMEOUT = 600
STOP_GRACE_SECONDS = 10
LOG_TAIL_LINES = 20


def choose_engine(requested: str) -> str:
    """``auto``: vLLM when its engine environment is installed and runs here (its CPU build, or the
    CUDA build with a GPU visible), else transformers."""
    if requested != "auto":
        return requested
    found = engines.installed("vllm")
    return "vllm" if found is not None and found.usable_here() else "transformers"


def pick_port(port: int, *, option: str = "--port") -> int:
    """``port`` if free on 127.0.0.1 (any free port for 0); a clear error if busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise UserError(
                f"port {port} is already in use on 127.0.0.1; pass {option} N, or {option} 0 for a free one"
            ) from None
        return sock.getsockname()[1]


def local_weights(spec: ServeSpec) -> Path | None:
    """Where the weights are on this machine (downloading a bucket checkpoint first)."""
    if spec.model.path is not None:
        return spec.model.path
    if spec.model.bucket is None:
        return None
    uri = spec.model.bucket
    with store_env(spec.envs, spec.secrets):
        with ui.spinner(f"Checking {uri}"):
            check_checkpoint(uri)
        dest = home() / "cache" / uri.scheme / uri.bucket / uri.prefix
        return download_checkpoint(uri, dest)


def serve_locally(spec: ServeSpec, *, timeout: float | None = None, registry: Registry | None = None) -> Record:
    """Start the engine for ``spec`` here and wait until it answers; returns the RUNNING record."""
    registry = registry or Registry()
    engine = choose_engine(spec.engine)
    vllm_env = engines.require("vllm", why="--engine vllm on this machine").path if engine == "vllm" else None
    if engine == "transformers" and shutil.which("transformers", path=_engine_path()) is None:
        raise UserError("local serving needs transformers: pip install 'llm-atc[local]' "
                        "(or vLLM: llm-atc engines install vllm)")
    if engine == "transformers" and spec.auth:
        raise UserError("transformers serve has no API keys; drop --secret VLLM_API_KEY or use --engine vllm")
    _check_name_free(spec.cluster, registry)
    port = pick_port(spec.port)
    spec = _replace(spec, engine=engine, port=port)
    weights = local_weights(spec)
    workdir = home() / "local" / spec.cluster
    workdir.mkdir(parents=True, exist_ok=True)
    template = write_chat_template(spec, workdir / "chat-template.jinja")
    config = render_serve_task(spec, local=LocalRun(weights, workdir, vllm_env), chat_template=template)
    log_path = workdir / "server.log"
    endpoint = f"http://127.0.0.1:{port}"
    record = registry.add(
        Record(
            name=spec.model.name,
            kind="serve",
            model=spec.model.location,
            cluster=spec.cluster,
            status=Status.LAUNCHING,
            cloud="local",
            accelerator=None,
            checkpoint_uri=str(spec.model.bucket) if spec.model.bucket else None,
            engine=engine,
            port=port,
            endpoint=endpoint,
            details={"log": str(log_path)},
        )
    )
    api_key = spec.secrets.get(API_KEY_SECRET) if spec.auth else None
    if api_key:
        from llm_atc import credentials

        credentials.save(spec.cluster, api_key)
    process = _start(config, spec.secrets, log_path, workdir, weights_are_local=weights is not None)
    registry.update(record, pid=process.pid, details={**record.details, "started": _start_time(process.pid)})
    backend = LocalBackend()
    try:
        wait_ready(
            endpoint,
            engine=engine,
            timeout=timeout or LOCAL_READY_TIMEOUT,
            message=f"Starting {engine} for {spec.model.name} on 127.0.0.1:{port}",
            check_alive=lambda: None if process.poll() is None else f"the engine exited with code {process.returncode}",
            interval=0.25,
            api_key=api_key,
        )
    except (LaunchError, KeyboardInterrupt) as exc:
        backend.down(record)
        registry.update(record, status=Status.FAILED)
        if isinstance(exc, KeyboardInterrupt):
            raise
        tail = tail_lines(log_path, LOG_TAIL_LINES)
        reason = str(exc) if isinstance(exc, EngineExited) else f"{exc}; stopped it"
        raise LaunchError(f"{reason}. Last lines of {log_path}:\n{tail}") from None
    registry.update(record, status=Status.RUNNING)
    return record


def _check_name_free(cluster: str, registry: Registry) -> None:
    for record in registry.records(kind="serve"):
        if record.cluster == cluster and record.status in (Status.RUNNING, Status.LAUNCHING):
            if LocalBackend().states([record])[record.id].status in (Status.RUNNING, Status.LAUNCHING):
                raise UserError(
                    f"{cluster} is already running ({record.endpoint}); stop it with `llm-atc stop {cluster}` "
                    "or pass -c NAME"
                )


def _replace(spec: ServeSpec, **changes) -> ServeSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def _engine_path() -> str:
    """PATH with this interpreter's bin folder first, so a venv's engines are found unactivated."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _start(
    config: dict, secrets: dict[str, str], log_path: Path, workdir: Path, *, weights_are_local: bool
) -> subprocess.Popen:
    env = dict(os.environ)
    env.update({k: "" if v is None else str(v) for k, v in config.get("envs", {}).items()})
    env.update({k: "" if v is None else str(v) for k, v in (config.get("secrets") or {}).items()})
    env.update(secrets)
    env["PATH"] = _engine_path()
    env.setdefault("SKYPILOT_NUM_GPUS_PER_NODE", "1")
    env.setdefault("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    if weights_are_local:
        env.setdefault("HF_HUB_OFFLINE", "1")
    with log_path.open("ab") as log:
        log.write(f"--- llm-atc: starting at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        log.flush()
        return subprocess.Popen(
            ["bash", "-c", config["run"]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            start_new_session=True,
        )


def _start_time(pid: int) -> float | None:
    """The process's start time, or None when it is gone (or a zombie)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


def tail_lines(path: Path, count: int) -> str:
    if not path.is_file():
        return "(no log)"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-count:])


class LocalBackend:
    """Processes on this machine, one process group per deployment."""

    name = "local"

    def _alive(self, record: Record) -> bool:
        if not record.pid:
            return False
        started = _start_time(record.pid)
        expected = record.details.get("started")
        return started is not None and (expected is None or abs(started - expected) < 1.0)

    def endpoint(self, record: Record) -> str:
        if not self._alive(record):
            raise NotFoundError(f"{record.name} is not running here (status {record.status}); see `llm-atc status`")
        return record.endpoint

    def states(self, records: list[Record]) -> dict[int, LiveState]:
        states = {}
        for record in records:
            if self._alive(record):
                states[record.id] = LiveState(record.status, cloud="local")
            elif record.status in (Status.RUNNING, Status.LAUNCHING):
                states[record.id] = LiveState(Status.FAILED, "process gone", cloud="local")
            else:
                states[record.id] = LiveState(record.status, "", cloud="local")
        return states

    def logs(self, record: Record, *, follow: bool, output: TextIO | None = None) -> int:
        path = Path(record.details.get("log", ""))
        if not path.is_file():
            raise NotFoundError(f"no log for {record.name} at {path}")
        output = output or sys.stdout
        with path.open("r", errors="replace") as handle:
            output.write(handle.read())
            while follow and self._alive(record):
                chunk = handle.read()
                if chunk:
                    output.write(chunk)
                    output.flush()
                else:
                    time.sleep(0.5)
            output.write(handle.read())
        output.flush()
        return 0

    def check_stoppable(self, record: Record) -> None:
        """A local engine can always be stopped."""

    def stop(self, record: Record) -> None:
        """SIGTERM to the process group, then SIGINT, then SIGKILL; idempotent.

        `transformers serve` ignores SIGTERM while it streams a reply, but stops on SIGINT.
        Children left in the group (e.g. vLLM workers) are stopped even when the
        engine's main process is already gone.
        """
        if not record.pid or not (self._alive(record) or _group_alive(record.pid)):
            return
        for sig, grace in ((signal.SIGTERM, STOP_GRACE_SECONDS / 2), (signal.SIGINT, STOP_GRACE_SECONDS / 2),
                           (signal.SIGKILL, 5.0)):
            _signal_group(record.pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(record.pid):
                time.sleep(0.1)
            if not _group_alive(record.pid):
                return

    def down(self, record: Record) -> None:
        self.stop(record)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies count as gone)."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return False
