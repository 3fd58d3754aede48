"""``serve``: spec → recipe overlay → SkyPilot task (or local process) → registry.

Shared by the CLI and the Python API; printing goes through :mod:`llm_atc.ui`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llm_atc import ui
from llm_atc.errors import LaunchError, UserError
from llm_atc.readiness import EngineExited, wait_ready
from llm_atc.registry import Record, Registry, Status, home
from llm_atc.render import render_serve_task
from llm_atc.spec import API_KEY_SECRET, ServeSpec
from llm_atc.storage import Checkpoint, check_checkpoint, store_env

CLOUD_READY_TIMEOUT = 30 * 60
LOG_TAIL_LINES = 20


@dataclass
class Prepared:
    """A serve that passed every check and is ready to launch."""

    spec: ServeSpec
    config: dict
    checkpoint: Checkpoint | None
    api_key: str | None = field(default=None, repr=False)

    @property
    def yaml(self) -> str:
        return task_yaml(self.config)

    @property
    def secrets(self) -> dict[str, str]:
        """The secret values the task gets at launch (the API key included)."""
        return {**self.spec.secrets, API_KEY_SECRET: self.api_key} if self.api_key else dict(self.spec.secrets)


class _TaskDumper(yaml.SafeDumper):
    """Writes multi-line strings (setup, run) as literal blocks, like the recipes."""


def _str_representer(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_TaskDumper.add_representer(str, _str_representer)


def task_yaml(config: dict) -> str:
    """The task config as YAML, in the recipe's key order."""
    return yaml.dump(config, Dumper=_TaskDumper, sort_keys=False, width=120)


def prepare(spec: ServeSpec) -> Prepared:
    """Check the checkpoint, render the task and let SkyPilot validate it."""
    from llm_atc.backends import skypilot

    checkpoint, adapters = _check_buckets(spec)
    template = write_chat_template(spec, home() / "tasks" / f"{spec.cluster}-{time.strftime('%Y%m%d-%H%M%S')}.jinja")
    config = render_serve_task(spec, checkpoint, features=skypilot.node_features(spec.placement), adapters=adapters,
                               chat_template=template)
    api_key = None
    if spec.auth:
        from llm_atc import credentials

        api_key = spec.secrets.get(API_KEY_SECRET) or credentials.new_key()
        config.setdefault("secrets", {})[API_KEY_SECRET] = None
    prepared = Prepared(spec, config, checkpoint, api_key)
    skypilot.build_task(config, prepared.secrets)
    return prepared


def _check_buckets(spec: ServeSpec) -> tuple[Checkpoint | None, dict[str, Checkpoint]]:
    """Check every bucket the serve reads, with the store settings given in ``--envs``:
    the checkpoint, the weights cache, the ``--lora`` adapters (by name)."""
    checkpoint = None
    adapters = {}
    with store_env(spec.envs, spec.secrets):
        if spec.model.bucket is not None:
            with ui.spinner(f"Checking {spec.model.bucket}"):
                checkpoint = check_checkpoint(spec.model.bucket)
        if spec.cache_weights:
            from llm_atc.storage import BucketURI, ObjectStore

            cache = BucketURI.parse(spec.cache_weights)
            with ui.spinner(f"Checking {cache.scheme}://{cache.bucket}"):
                if not ObjectStore(cache.scheme).bucket_exists(cache.bucket):
                    raise UserError(f"--cache_weights: bucket {cache.scheme}://{cache.bucket} does not exist "
                                    "or is not visible to you")
        for adapter in spec.loras:
            if adapter.bucket is not None:
                with ui.spinner(f"Checking {adapter.bucket}"):
                    adapters[adapter.name] = check_checkpoint(adapter.bucket)
                if not adapters[adapter.name].is_adapter:
                    raise UserError(f"--lora {adapter.name}: {adapter.bucket} holds a full model, not a LoRA adapter")
    return checkpoint, adapters


def write_chat_template(spec: ServeSpec, path: Path) -> Path | None:
    """Write ``--chat_template``'s text to ``path`` (the file vLLM reads on the node); None without one."""
    if spec.chat_template is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.chat_template)
    return path


def save_task(config: dict, cluster: str) -> str:
    """Write the (secret-free) task YAML under ``$LLM_ATC_HOME/tasks/``; returns its path."""
    folder = home() / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cluster}-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    path.write_text(task_yaml(config))
    return str(path)


def launch_on_skypilot(
    prepared: Prepared,
    *,
    backend=None,
    registry: Registry | None = None,
    timeout: float = CLOUD_READY_TIMEOUT,
) -> Record:
    """Launch on a SkyPilot cluster and wait until the engine answers.

    Returns the registry record (RUNNING, or LAUNCHING with ``--detach_run``).
    KeyboardInterrupt during the wait leaves the cluster up and propagates.
    """
    from llm_atc.backends.skypilot import SkyPilotBackend, build_task

    spec = prepared.spec
    backend = backend or SkyPilotBackend()
    registry = registry or Registry()
    record = registry.add(
        Record(
            name=spec.served_name,
            kind="serve",
            model=spec.model.location,
            cluster=spec.cluster,
            status=Status.LAUNCHING,
            cloud=spec.placement.cloud,
            region=spec.placement.region,
            accelerator=spec.placement.accelerator_text,
            checkpoint_uri=str(spec.model.bucket) if spec.model.bucket else None,
            task_yaml=save_task(prepared.config, spec.cluster),
            engine=spec.engine,
            port=spec.port,
            # Without opened ports the endpoint is the head node's address (see SkyPilotBackend.endpoint).
            details={"open_ports": "ports" in prepared.config.get("resources", {})},
        )
    )
    if prepared.api_key:
        from llm_atc import credentials

        credentials.save(spec.cluster, prepared.api_key)
    task = build_task(prepared.config, prepared.secrets)
    try:
        if spec.replicas is not None:
            ui.info(f"Starting service {spec.cluster} for {spec.served_name} on SkyServe ({spec.replicas.text}, "
                    f"{spec.placement.resources_text} each)")
            endpoint = backend.launch_service(task, name=spec.cluster)
            registry.update(record, endpoint=endpoint, details={**record.details, "service": True})
        else:
            ui.info(f"Launching {spec.served_name} on cluster {spec.cluster} ({spec.placement.resources_text})")
            job_id = backend.launch(task, cluster=spec.cluster, stream=not spec.detach_setup,
                                    no_setup=spec.no_setup)
            registry.update(record, details={**record.details, "job_id": job_id})
    except KeyboardInterrupt:
        raise
    except Exception:
        registry.update(record, status=Status.FAILED)
        raise
    if spec.detach_run:
        return record

    known: list[str] = []  # the endpoint does not change while the cluster is up: ask SkyPilot once

    def endpoint_or_none() -> str | None:
        if not known:
            try:
                known.append(backend.endpoint(record))
            except LaunchError:
                return None
        return known[0]

    try:
        waited = wait_ready(
            endpoint_or_none,
            engine=spec.engine,
            timeout=timeout,
            message=f"Waiting for {spec.engine} on {spec.cluster}",
            check_alive=_throttled(lambda: backend.job_failed(record), every=15.0),
            interval=1.0,
            api_key=prepared.api_key,
        )
    except EngineExited as exc:
        registry.update(record, status=Status.FAILED)
        raise LaunchError(_failure_report(str(exc), record, backend, keep=spec.keep_on_failure)) from None
    except LaunchError:
        registry.update(record, status=Status.FAILED)
        raise
    registry.update(record, status=Status.RUNNING, endpoint=known[0])
    ui.info(f"Ready after {waited:.0f}s of waiting.")
    return record


def _failure_report(reason: str, record: Record, backend, *, keep: bool) -> str:
    """What went wrong, the end of the engine's log, and what became of the cluster."""
    tail = backend.log_tail(record, LOG_TAIL_LINES)
    lines = [f"{reason}.", f"Last lines of its log:\n{tail}" if tail else "Its log is empty."]
    if keep:
        lines.append(f"The cluster is kept (--keep_on_failure): llm-atc logs {record.cluster}; "
                     f"llm-atc down {record.cluster}")
    else:
        with ui.spinner(f"Tearing down {record.cluster}"):
            backend.down(record)
        lines.append(f"Tore down {record.cluster} (--keep_on_failure keeps it for debugging).")
    return "\n".join(lines)


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
