"""Every launch, on every backend: record it, start it, wait for it (or follow it), record what became
of it, and clean up after what this process started when it is interrupted (SIGINT, SIGTERM or SIGHUP).

A deployment is waited for until its engine answers; a training run is followed until its job
ends. Interrupted, a process started here is stopped (its record says STOPPED); a cluster is left
up, and the CLI says how to check on it.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from llm_atc import ui
from llm_atc.app.serve import PreparedServe
from llm_atc.app.train import PreparedTrain, upload_data
from llm_atc.backends import Backend, Workload, backend_for
from llm_atc.backends.local import LocalBackend
from llm_atc.errors import LaunchError, UserError
from llm_atc.paths import home, write_private
from llm_atc.readiness import EngineExited, first_answers, wait_ready
from llm_atc.registry import Record, Registry, Status
from llm_atc.render import task_yaml
from llm_atc.storage import BucketURI, ObjectStore, store_env
from llm_atc.tunnel import forward

LOG_TAIL_LINES = 20


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived while llm-atc was launching or waiting."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def interrupts() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGHUP interrupt like Ctrl-C does (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    except KeyboardInterrupt as exc:
        raise exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def save_task(config: dict, cluster: str) -> str:
    """Write the (secret-free) task YAML under ``$LLM_ATC_HOME/tasks/``, never over an earlier one (a service's
    versions each keep theirs); returns its path."""
    stem = home() / "tasks" / f"{cluster}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, number = stem.with_suffix(".yaml"), 1
    while path.exists():
        number += 1
        path = stem.with_name(f"{stem.name}-{number}.yaml")
    return str(write_private(path, task_yaml(config)))


def _start(workload: Workload, registry: Registry, backend: Backend, *, api_key: str | None = None) -> Record:
    """Record the workload (LAUNCHING) and start it on its backend."""
    record = workload.record
    record.task_yaml = save_task(workload.config, record.cluster)
    holds_port = backend.holds_port if isinstance(backend, LocalBackend) and record.kind == "serve" else None
    registry.add(record, holds_port=holds_port)
    if api_key:
        from llm_atc import credentials

        credentials.save(record.cluster, api_key)
    try:
        changes = backend.launch(workload)
    except KeyboardInterrupt:
        if record.mode == "local":
            backend.down(record)
            registry.update(record, status=Status.STOPPED)
        raise
    except Exception:
        registry.update(record, status=Status.FAILED)
        raise
    registry.update(record, details={**record.details, **changes.pop("details", {})}, **changes)
    return record


def serve(prepared: PreparedServe, *, registry: Registry, backend: Backend | None = None) -> Record:
    """Launch a prepared serve and wait until its engine answers; the RUNNING record (LAUNCHING with
    ``--detach_run``). Raises LaunchError when the engine fails first (its log tail said)."""
    spec, workload = prepared.spec, prepared.workload
    backend = backend or backend_for(workload.record)
    record = workload.record
    with interrupts():
        if spec.replicas is not None:
            ui.info(
                f"Starting service {spec.cluster} for {spec.served_text} on SkyServe ({spec.replicas.text}, "
                f"{spec.placement.resources_text} each)"
            )
        elif not record.is_local:
            ui.info(f"Launching {spec.served_text} on cluster {spec.cluster} ({spec.placement.resources_text})")
        record = _start(workload, registry, backend, api_key=prepared.api_key)
        if spec.detach_run:
            return record
        timeout = spec.timeout or prepared.ready_timeout
        try:
            if record.details.get("private") and not record.is_local:
                waited = _wait_private(record, backend, prepared, timeout)
            else:
                waited = _wait_serving(record, backend, prepared, timeout)
        except KeyboardInterrupt:
            if record.is_local:
                backend.down(record)
                registry.update(record, status=Status.STOPPED)
            raise
        except LaunchError as exc:
            registry.update(record, status=Status.FAILED)
            if isinstance(exc, EngineExited):
                raise LaunchError(_failure_report(str(exc), record, backend, keep=spec.keep_on_failure)) from None
            if record.is_local:
                raise LaunchError(_failure_report(f"{exc}; stopped it", record, backend, keep=False)) from None
            raise
    registry.update(record, status=Status.RUNNING)
    if not record.is_local:
        ui.info(f"Ready after {waited:.0f}s of waiting.")
    return record


def _wait_serving(record: Record, backend: Backend, prepared: PreparedServe, timeout: float) -> float:
    """Poll the engine until it answers; the seconds waited."""
    endpoint: str | Callable[[], str | None]
    known: list[str] = []  # a cluster's endpoint does not change while it is up: SkyPilot is asked once
    if record.is_local:
        endpoint, check, interval = record.endpoint or "", lambda: backend.ended(record), 0.25
        message = f"Starting {record.engine} for {', '.join(record.served)} on {endpoint.split('://')[-1]}"
    else:

        def endpoint() -> str | None:
            if not known:
                try:
                    known.append(backend.endpoint(record))
                except LaunchError:
                    return None
            return known[0]

        check, interval = _throttled(lambda: backend.ended(record), every=15.0), 1.0
        message = f"Waiting for {record.engine} on {record.cluster}"
    waited = wait_ready(
        endpoint,
        engine=record.engine or "vllm",
        timeout=timeout,
        message=message,
        check_alive=check,
        interval=interval,
        api_key=prepared.api_key,
        cafile=record.details.get("tls_cert"),
    )
    if not record.is_local:
        record.endpoint = known[0]
    with ui.spinner(f"Sending {', '.join(record.served)} a first request"):
        first_answers(record.endpoint or "", record, api_key=prepared.api_key)
    return waited


def _wait_private(record: Record, backend, prepared, timeout: float) -> float:
    """A private endpoint (no port opened) is waited for through an SSH tunnel to the node, as
    `llm-atc endpoint --forward` reaches it."""
    import shutil

    if shutil.which("ssh") is None:
        raise UserError(
            "a private endpoint is reached through SSH: install the OpenSSH client (ssh), or serve with --open_port"
        )
    start = time.monotonic()
    check = _throttled(lambda: backend.ended(record), every=15.0)
    with ui.spinner(f"Waiting for {record.engine} on {record.cluster} (private: through an SSH tunnel)") as spinner:
        while True:
            dead = check()
            if dead:
                raise EngineExited(dead)
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                raise LaunchError(f"the engine was not ready after {timeout:.0f}s")
            try:
                with forward(record, timeout=min(30.0, max(timeout - elapsed, 1.0))) as tunnel:
                    first_answers(tunnel.endpoint, record, api_key=prepared.api_key)
                    return time.monotonic() - start
            except EngineExited:
                raise
            except (LaunchError, UserError) as exc:  # no SSH access yet, or the engine not answering yet
                spinner.update(elapsed, str(exc)[:80])
                time.sleep(5)


# A line of a Python traceback, or the prefix vLLM puts on its processes' log lines.
_FRAME = re.compile(r"^(\s|Traceback \(most recent call last\)|During handling of|The above exception)")
_PROCESS_PREFIX = re.compile(r"^\(\w+ pid=\d+\) (?:[A-Z]+ [\d-]+ [\d:]+ \[[^\]]*\] ?)?")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def meaningful_tail(text: str, count: int = 8) -> str:
    """The last ``count`` lines of a log that say something: no traceback frames, no repeated lines,
    vLLM's process prefixes taken off."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = _PROCESS_PREFIX.sub("", _ANSI.sub("", raw)).rstrip()
        if line and not _FRAME.match(line) and (not lines or lines[-1] != line):
            lines.append(line)
    return "\n".join(lines[-count:])


def _failure_report(reason: str, record: Record, backend, *, keep: bool) -> str:
    """What went wrong, what the end of the engine's log says, where the whole log is, and what became of it."""
    tail = meaningful_tail(backend.log_tail(record, 10 * LOG_TAIL_LINES))
    where = record.details.get("log") or f"llm-atc logs {record.cluster}"
    lines = [f"{reason}.", f"The end of its log ({where}):\n{tail}" if tail else "Its log is empty."]
    if record.is_local:
        backend.down(record)
    elif keep:
        lines.append(
            f"The cluster is kept (--keep_on_failure): llm-atc logs {record.cluster}; llm-atc down {record.cluster}"
        )
    else:
        with ui.spinner(f"Tearing down {record.cluster}"):
            backend.down(record)
        lines.append(f"Tore down {record.cluster} (--keep_on_failure keeps it for debugging).")
    return "\n".join(lines)


def train(prepared: PreparedTrain, *, registry: Registry, backend: Backend | None = None) -> Record:
    """Upload the data, launch a prepared run, and (unless detached) follow it to its end: the
    SUCCEEDED record, or LaunchError. A cluster that ran it attached is torn down when it ends."""

    spec, workload = prepared.spec, prepared.workload
    backend = backend or backend_for(workload.record)
    with interrupts():
        upload_data(prepared)
        if workload.record.is_local:
            ui.info(f"Training {spec.run} ({spec.model_type}) on this machine; log: {workload.log}")
        record = _start(workload, registry, backend)
        if record.mode == "managed":
            registry.update(record, status=Status.RUNNING)
            ui.info(
                f"Managed job {record.details.get('job_id')} submitted: it recovers from preemptions and resumes "
                f"from its last checkpoint. Follow it with `llm-atc logs {spec.run}`."
            )
            return record
        registry.update(record, status=Status.RUNNING)
        if spec.detach_run:
            return record
        start = time.monotonic()
        try:
            code = _follow(record, backend)
        except KeyboardInterrupt:
            if record.is_local:
                backend.down(record)
                registry.update(record, status=Status.STOPPED)
            raise
    registry.update(record, status=Status.SUCCEEDED if code == 0 else Status.FAILED)
    if workload.down_when_done:
        # SkyPilot's autodown would get there too, a minute or so later (still billing).
        with ui.spinner(f"Tearing down {record.cluster}"):
            backend.down(record)
    if code != 0:
        where = workload.log if record.is_local else f"`llm-atc logs {spec.run}`"
        resume = (
            " Once fixed, the same command with --resume continues from its last checkpoint."
            if _has_checkpoints(record)
            else ""
        )
        tail = meaningful_tail(backend.log_tail(record, 10 * LOG_TAIL_LINES), 4)
        raise LaunchError(
            f"training run {spec.run} failed (exit code {code}); the whole log: {where}.{resume}"
            + (f"\nThe end of its log:\n{tail}" if tail else "")
        )
    ui.info(f"Finished in {time.monotonic() - start:.0f}s; the model is at {spec.output_uri}")
    return record


def _has_checkpoints(record: Record) -> bool:
    """Whether a failed run left checkpoints that --resume would continue from."""
    from pathlib import Path

    uri = record.checkpoint_uri or ""
    try:
        if "://" in uri:
            folder = BucketURI.parse(uri).child("checkpoints")
            with store_env(record.details.get("store_env") or {}):
                return any(True for _ in ObjectStore(folder.scheme).list_objects(folder))
        work = Path(record.details.get("log", "")).parent / "work" / "checkpoints"
        return work.is_dir() and any(work.iterdir())
    except (UserError, OSError):
        return False


def _follow(record: Record, backend: Backend) -> int:
    """Stream the run's log (to stderr when it runs here) until it ends; its exit code."""
    if not isinstance(backend, LocalBackend):
        return backend.logs(record, follow=True)
    import io
    import sys

    class Echo(io.StringIO):  # the training log, as it grows, on stderr (progress, not results); not tracebacks
        in_traceback = False

        def write(self, text: str) -> int:
            if ui.is_quiet():
                return len(text)
            for line in text.splitlines(keepends=True):
                if line.startswith("Traceback (most recent call last)"):
                    self.in_traceback = True
                elif self.in_traceback and not _FRAME.match(line):
                    self.in_traceback = False  # the exception's own line ends the traceback
                if not self.in_traceback:
                    sys.stderr.write(line)
            return len(text)

        def flush(self) -> None:
            sys.stderr.flush()

    backend.logs(record, follow=True, output=Echo())
    while (code := backend.exit_code(record)) is None:
        time.sleep(0.1)
    return code


def still_up_message(cluster: str) -> str:
    """What to run after leaving a launch early: the cluster stays up."""
    return (
        f"The cluster {cluster} is left up. Check on it with:\n"
        f"  llm-atc status\n  llm-atc endpoint {cluster} --check\n  llm-atc down {cluster}"
    )


def _throttled(check, *, every: float):
    """Call ``check`` at most once per ``every`` seconds (it costs an API round trip)."""
    last = [0.0]

    def run():
        now = time.monotonic()
        if now - last[0] < every:
            return None
        last[0] = now
        return check()

    return run
