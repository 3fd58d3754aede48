"""``--cloud local``: the same recipes' ``run`` scripts, run as process groups on this machine.

A workload's script is executed by bash with the rendered envs and secrets (setup is skipped:
the ``[local]``/``[train]`` extras and ``llm-atc engines`` install what it needs), logging to
``$LLM_ATC_HOME/local/<cluster>/``. Its record keeps the pid and the process's start time, so a
reused pid is never taken for ours.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from llm_atc.backends._base import LiveState, Workload
from llm_atc.errors import NotFoundError, UserError
from llm_atc.paths import open_private
from llm_atc.recipes.train.contract import FINISHED_MARKER
from llm_atc.registry import Record, Status

STOP_GRACE_SECONDS = 10
CLAIM_SECONDS = 300  # a deployment recorded without its process yet holds its port this long


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


def free_ports(count: int, *, besides: int) -> tuple[int, ...]:
    """``count`` distinct free ports on 127.0.0.1, none of them ``besides`` (held open until all are found)."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            if sock.getsockname()[1] == besides:
                sock.close()
                continue
            sockets.append(sock)
        return tuple(sock.getsockname()[1] for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def engine_path() -> str:
    """PATH with this interpreter's bin folder first, so a venv's tools are found unactivated."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def process_env(config: dict, secrets: dict[str, str]) -> dict[str, str]:
    """The environment a recipe's ``run`` gets here: ours, its envs, its secrets (values attached)."""
    env = dict(os.environ)
    env.update({k: "" if v is None else str(v) for k, v in config.get("envs", {}).items()})
    env.update({k: "" if v is None else str(v) for k, v in (config.get("secrets") or {}).items()})
    env.update(secrets)
    env["PATH"] = engine_path()
    env.setdefault("SKYPILOT_NUM_GPUS_PER_NODE", "1")
    env.setdefault("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    return env


def start_time(pid: int) -> float | None:
    """The process's start time, or None when it is gone (or a zombie)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


def start_ticks(pid: int) -> int | None:
    """Linux: when the process started, in clock ticks since boot (/proc/PID/stat's starttime). Unlike a start time
    in wall-clock seconds it never moves: that one is derived from the boot time, which the kernel recomputes from
    the clock and which a clock adjustment of a few milliseconds can shift by a whole second."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _log_end(path: Path, size: int = 256 * 1024) -> str:
    """The last ``size`` bytes of a log (the lines an engine writes while it shuts down come after the reason)."""
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - size))
        return handle.read().decode(errors="replace")


def tail_lines(path: Path, count: int) -> str:
    if not path.is_file():
        return "(no log)"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-count:])


class LocalBackend:
    """Processes on this machine, one process group per workload."""

    name = "local"

    def __init__(self) -> None:
        self._children: dict[int, subprocess.Popen] = {}  # what this process started, by pid

    def validate(self, workload: Workload) -> None:
        """Nothing to check: the recipe's script runs as rendered."""

    def launch(self, workload: Workload) -> dict:
        """Start the recipe's ``run`` in a process group of its own, logging to the workload's log."""
        config = workload.config
        cwd = workload.workdir or Path(config.get("workdir") or ".")
        log_path = workload.log
        if log_path is None:  # prepare() gives every workload run here its log file
            raise ValueError(f"{workload.record.name}: a workload run here needs a log file")
        with open_private(log_path) as log:
            log.write(f"--- llm-atc: starting at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
            log.flush()
            process = subprocess.Popen(
                ["bash", "-c", config["run"]],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=process_env(config, workload.secrets),
                cwd=cwd,
                start_new_session=True,
            )
        self._children[process.pid] = process
        started = {"started": start_time(process.pid), "start_ticks": start_ticks(process.pid)}
        return {"pid": process.pid, "details": started}

    def alive(self, record: Record) -> bool:
        """The record's process runs (the same process, not a later one given its pid: it started when recorded)."""
        if not record.pid:
            return False
        started = start_time(record.pid)
        if started is None:
            return False
        ticks = record.details.get("start_ticks")
        if ticks is not None and (now := start_ticks(record.pid)) is not None:
            return now == ticks
        expected = record.details.get("started")  # elsewhere (and for older records): within the clock's drift
        return expected is not None and abs(started - expected) < 2.0

    def holds_port(self, record: Record) -> bool:
        """Whether a local deployment still holds its port: its engine runs, or it is being started
        (recorded in the last minutes, its process not known yet)."""
        if record.pid:
            return self.alive(record)
        return time.time() - record.created_at < CLAIM_SECONDS

    def serves_port(self, record: Record) -> bool:
        """Whether the port is bound by a process of the record's own group (and not by another program)."""
        import psutil

        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) != record.pid:
                    continue
                if any(
                    c.laddr and c.laddr.port == record.port and c.status == psutil.CONN_LISTEN
                    for c in proc.net_connections(kind="tcp")
                ):
                    return True
            except (OSError, psutil.Error):
                continue
        return False

    def ended(self, record: Record) -> str | None:
        child = self._children.get(record.pid or -1)
        if child is not None:
            code = child.poll()
            return None if code is None else f"the {self._what(record)} exited with code {code}"
        return None if self.alive(record) else f"the {self._what(record)} is gone"

    def exit_code(self, record: Record) -> int | None:
        """The exit code of a process this backend started and that has ended."""
        child = self._children.get(record.pid or -1)
        return None if child is None else child.poll()

    @staticmethod
    def _what(record: Record) -> str:
        return "engine" if record.kind == "serve" else "training process"

    def endpoint(self, record: Record) -> str:
        if not self.alive(record):
            raise NotFoundError(f"{record.name} is not running here (status {record.status}); see `llm-atc status`")
        return record.endpoint or ""

    def states(self, records: list[Record]) -> dict[int, LiveState]:
        states = {}
        for record in records:
            if self.alive(record):
                states[record.key] = LiveState(record.status, cloud="local")
            elif record.is_active:
                _end_orphans(record.pid)  # what the leader left behind (vLLM's engine core, its workers) ends too
                status, detail = self._after(record)
                states[record.key] = LiveState(status, detail, cloud="local", gone=True)
            else:
                states[record.key] = LiveState(record.status, "", cloud="local")
        return states

    @staticmethod
    def _after(record: Record) -> tuple[str, str]:
        """What a process that ended on its own leaves, and why: a training run that printed its last line
        succeeded; a deployment its watcher ended (--idle_minutes, --max_hours) is down; anything else failed."""
        from llm_atc.recipes.serve.llm_atc_watch import ended_by_limit

        text = _log_end(Path(record.details.get("log", "")))
        if record.kind == "train" and FINISHED_MARKER in text:
            return Status.SUCCEEDED, "finished"
        reason = ended_by_limit(text) if record.kind == "serve" else None
        return (Status.DOWN, reason) if reason else (Status.FAILED, "process gone")

    def logs(self, record: Record, *, follow: bool, output: TextIO | None = None) -> int:
        path = Path(record.details.get("log", ""))
        if not path.is_file():
            raise NotFoundError(f"no log for {record.name} at {path}")
        output = output or sys.stdout
        with path.open("r", errors="replace") as handle:
            output.write(handle.read())
            while follow and self.alive(record):
                chunk = handle.read()
                if chunk:
                    output.write(chunk)
                    output.flush()
                else:
                    time.sleep(0.5)
            output.write(handle.read())
        output.flush()
        return self.exit_code(record) or 0

    def log_tail(self, record: Record, lines: int) -> str:
        return tail_lines(Path(record.details.get("log", "")), lines)

    def check_stoppable(self, record: Record) -> None:
        """A process here can always be stopped."""

    def stop(self, record: Record) -> None:
        """SIGTERM to the process group, then SIGINT, then SIGKILL; idempotent.

        `transformers serve` ignores SIGTERM while it streams a reply, but stops on SIGINT.
        Children left in the group (e.g. vLLM's engine core) are stopped even when the main
        process is already gone; a group whose leader's pid was reused by another program is
        left alone.
        """
        leader_gone = record.pid and start_time(record.pid) is None  # else it is ours, or another program's
        if not record.pid or not (self.alive(record) or (leader_gone and _group_alive(record.pid))):
            return
        for sig, grace in (
            (signal.SIGTERM, STOP_GRACE_SECONDS / 2),
            (signal.SIGINT, STOP_GRACE_SECONDS / 2),
            (signal.SIGKILL, 5.0),
        ):
            _signal_group(record.pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(record.pid):
                self._reap(record)
                time.sleep(0.1)
            if not _group_alive(record.pid):
                self._reap(record)
                return

    def _reap(self, record: Record) -> None:
        child = self._children.get(record.pid or -1)
        if child is not None:
            child.poll()

    def put_folder(self, record: Record, folder: Path, dest: str) -> str:
        return str(folder)  # this machine is the node: the engine reads the folder where it is

    def replicas(self, record: Record) -> list[tuple[str, str, str, str, str]]:
        return []  # SkyServe runs services on clusters, never here

    def ready_replicas(self, record: Record) -> list[tuple[int, str]]:
        return []

    def update_service(self, record: Record, config: dict, secrets: dict[str, str], *, blue_green: bool) -> None:
        raise UserError(f"{record.cluster} runs on this machine, not as a SkyServe service")

    def down(self, record: Record) -> None:
        self.stop(record)


def _end_orphans(pgid: int | None) -> None:
    """Kill what is left of a group whose leader died (a vLLM engine core holding its memory, its workers): with
    the API server gone nothing can use them, so they get SIGKILL, not the graceful stop."""
    if not pgid or start_time(pgid) is not None:  # no group, or its leader lives (or its pid was reused)
        return
    deadline = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < deadline:
        _signal_group(pgid, signal.SIGKILL)
        time.sleep(0.1)


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
