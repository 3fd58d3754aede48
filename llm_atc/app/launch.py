"""Every launch, on every backend: record it, start it, wait for it (or follow it), record what became
of it, and clean up after what this process started when it is interrupted (SIGINT, SIGTERM or SIGHUP).

A deployment is waited for until its engine answers; a training run is followed until its job
ends. Interrupted, a process started here is stopped (its record says STOPPED); a cluster is left
up, and the CLI says how to check on it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from llm_atc import ui
from llm_atc.backends import backend_for
from llm_atc.errors import LaunchError, UserError
from llm_atc.paths import home, write_private
from llm_atc.readiness import EngineExited, wait_ready
from llm_atc.registry import Record, Registry, Status
from llm_atc.render import task_yaml

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
    """Write the (secret-free) task YAML under ``$LLM_ATC_HOME/tasks/``; returns its path."""
    path = home() / "tasks" / f"{cluster}-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    return str(write_private(path, task_yaml(config)))


def _start(workload, registry: Registry, backend, *, api_key: str | None = None) -> Record:
    """Record the workload (LAUNCHING) and start it on its backend."""
    record = workload.record
    record.task_yaml = save_task(workload.config, record.cluster)
    holds_port = backend.holds_port if record.mode == "local" and record.kind == "serve" else None
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


def serve(prepared, *, registry: Registry, backend=None) -> Record:
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
        try:
            waited = _wait_serving(record, backend, prepared, spec.timeout or prepared.ready_timeout)
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


def _wait_serving(record: Record, backend, prepared, timeout: float) -> float:
    """Poll the engine until it answers; the seconds waited."""
    if record.is_local:
        endpoint, check, interval = record.endpoint, lambda: backend.ended(record), 0.25
        message = f"Starting {record.engine} for {', '.join(record.served)} on {record.endpoint.split('://')[-1]}"
    else:
        known: list[str] = []  # the endpoint does not change while the cluster is up: ask SkyPilot once

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
        engine=record.engine,
        timeout=timeout,
        message=message,
        check_alive=check,
        interval=interval,
        api_key=prepared.api_key,
        cafile=record.details.get("tls_cert"),
    )
    if not record.is_local:
        record.endpoint = known[0]
    return waited


def _wait_private(record: Record, backend, prepared, timeout: float) -> float:
    """A private endpoint (no port opened) is waited for through an SSH tunnel to the node, as
    `llm-atc endpoint --forward` reaches it."""
    import shutil

    from llm_atc.tunnel import forward

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
                with forward(record, timeout=min(30.0, max(timeout - elapsed, 1.0))):
                    return time.monotonic() - start
            except (LaunchError, UserError) as exc:  # no SSH access yet, or the engine not answering yet
                spinner.update(elapsed, str(exc)[:80])
                time.sleep(5)


def _failure_report(reason: str, record: Record, backend, *, keep: bool) -> str:
    """What went wrong, the end of the engine's log, and what became of it."""
    tail = backend.log_tail(record, LOG_TAIL_LINES)
    lines = [f"{reason}.", f"Last lines of its log:\n{tail}" if tail else "Its log is empty."]
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


def train(prepared, *, registry: Registry, backend=None) -> Record:
    """Upload the data, launch a prepared run, and (unless detached) follow it to its end: the
    SUCCEEDED record, or LaunchError. A cluster that ran it attached is torn down when it ends."""
    from llm_atc.app.train import upload_data

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
        raise LaunchError(
            f"training run {spec.run} failed (exit code {code}); see {where}. Once fixed, "
            "the same command with --resume continues from its last checkpoint"
        )
    ui.info(f"Finished in {time.monotonic() - start:.0f}s; the model is at {spec.output_uri}")
    return record


def _follow(record: Record, backend) -> int:
    """Stream the run's log (to stderr when it runs here) until it ends; its exit code."""
    if not record.is_local:
        return backend.logs(record, follow=True)
    import sys

    class Echo:  # the training log, as it grows, on stderr (progress, not results)
        def write(self, text: str) -> None:
            if not ui.is_quiet():
                sys.stderr.write(text)

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
