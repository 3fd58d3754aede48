"""``train``: check data, bucket and name → upload data → render the recipe → launch → registry.

The data checks use the very functions the training script runs on the node
(``recipes/train/finetune.py``), so what passes here loads there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from llm_atc import ui
from llm_atc.errors import LaunchError, UserError
from llm_atc.recipes_catalog import recipes_dir
from llm_atc.registry import Record, Registry, Status, home
from llm_atc.render import render_train_task
from llm_atc.spec import TrainSpec
from llm_atc.storage import BucketURI, ObjectStore, store_env, upload_path

FINISHED_MARKER = "llm-atc: training finished:"


@lru_cache(maxsize=1)
def finetune_module():
    """``recipes/train/finetune.py`` as a module (its top level imports only the stdlib)."""
    path = recipes_dir() / "train" / "finetune.py"
    module_spec = importlib.util.spec_from_file_location("llm_atc_finetune", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def validate_data(data: str) -> dict:
    """Read and check every record of the data (downloading it first from a bucket)."""
    finetune = finetune_module()
    if "://" in data:
        uri = BucketURI.parse(data, option="--finetune_data")
        store = ObjectStore(uri.scheme)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / (Path(uri.prefix).name or "data")
            with ui.spinner(f"Reading {data}"):
                store.download(uri, local, lambda n: None)
            return _check_file(finetune, str(local), data)
    return _check_file(finetune, data, data)


def _check_file(finetune, path: str, shown: str) -> dict:
    try:
        conversations = finetune.load_conversations(path)
    except finetune.DataError as exc:
        raise UserError(f"--finetune_data {shown}: {exc}") from None
    return finetune.summarize(conversations)


@dataclass
class PreparedTrain:
    """A run that passed every check: its task config and the data URI the node reads."""

    spec: TrainSpec
    config: dict
    data_uri: str
    summary: dict


def prepare_train(spec: TrainSpec, registry: Registry | None = None) -> PreparedTrain:
    """Check the name, the bucket and the data; render the task; let SkyPilot validate it."""
    with store_env(spec.envs, spec.secrets):
        return _prepare_train(spec, registry or Registry())


def _prepare_train(spec: TrainSpec, registry: Registry) -> PreparedTrain:
    if registry.find_run(spec.run) is not None or any(r.name == spec.run for r in registry.records(kind="train")):
        raise UserError(f"a training run named {spec.run!r} already exists; pick another --name")
    output = None if "://" not in spec.output_uri else BucketURI.parse(spec.output_uri)
    if output is not None:
        store = ObjectStore(output.scheme)
        with ui.spinner(f"Checking {output.scheme}://{output.bucket}"):
            if not store.bucket_exists(output.bucket):
                raise UserError(f"--checkpoint_bucket {output.bucket!r} does not exist or is not visible to you")
            if any(key == "config.json" for key, *_ in store.list_objects(output)):
                raise UserError(f"{output} already holds a model; pick another --name")
    summary = validate_data(spec.data)
    ui.info(
        f"Data OK: {summary['conversations']} conversations, {summary['turns']} turns "
        f"({summary['assistant_turns']} assistant turns)"
    )
    data_uri = spec.data
    if spec.data_is_local and output is not None:
        data_uri = str(output.child("data", Path(spec.data).name))
    config = render_train_task(spec, data=data_uri)
    if not spec.is_local:
        from llm_atc.backends.skypilot import build_task

        build_task(config, spec.secrets)
    return PreparedTrain(spec, config, data_uri, summary)


def _record(prepared: PreparedTrain, registry: Registry) -> Record:
    from llm_atc.serving import save_task

    spec = prepared.spec
    return registry.add(
        Record(
            name=spec.run,
            kind="train",
            model=spec.base_model,
            cluster=spec.cluster,
            status=Status.LAUNCHING,
            cloud=spec.placement.cloud,
            region=spec.placement.region,
            accelerator=spec.placement.accelerator_text or None,
            checkpoint_uri=spec.output_uri,
            task_yaml=save_task(prepared.config, spec.cluster),
            details={"model_type": spec.model_type, "description": spec.description, "data": prepared.data_uri},
        )
    )


def upload_data(prepared: PreparedTrain) -> None:
    spec = prepared.spec
    if spec.data_is_local and prepared.data_uri != spec.data:
        target = BucketURI.parse(prepared.data_uri)
        folder = BucketURI(target.scheme, target.bucket, target.prefix.rsplit("/", 1)[0])
        with store_env(spec.envs, spec.secrets):
            upload_path(Path(spec.data), folder)
        ui.info(f"Uploaded {prepared.spec.data} to {prepared.data_uri}")


def launch_train(
    prepared: PreparedTrain, *, keep_cluster: bool = False, backend=None, registry: Registry | None = None
) -> Record:
    """Upload the data and launch the run on SkyPilot (a managed job with ``--use_spot``)."""
    from llm_atc.backends.skypilot import SkyPilotBackend, build_task

    spec = prepared.spec
    registry = registry or Registry()
    backend = backend or SkyPilotBackend()
    upload_data(prepared)
    record = _record(prepared, registry)
    task = build_task(prepared.config, spec.secrets)
    try:
        if spec.placement.use_spot:
            job_id = backend.launch_managed(task, name=spec.run, stream=not spec.detach_setup)
            registry.update(record, status=Status.RUNNING, details={**record.details, "managed_job_id": job_id})
            ui.info(f"Managed job {job_id} submitted: it recovers from preemptions and resumes from its "
                    f"last checkpoint. Follow it with `sky jobs logs {job_id}`.")
            return record
        job_id = backend.launch(
            task, cluster=spec.cluster, stream=not spec.detach_setup, no_setup=spec.no_setup, down=not keep_cluster
        )
    except Exception:
        registry.update(record, status=Status.FAILED)
        raise
    registry.update(record, status=Status.RUNNING, details={**record.details, "job_id": job_id})
    if spec.detach_run:
        return record
    code = backend.logs(record, follow=True)
    registry.update(record, status=Status.SUCCEEDED if code == 0 else Status.FAILED)
    if not keep_cluster:
        # SkyPilot's autodown would get there too, a minute or so later (still billing).
        with ui.spinner(f"Tearing down {spec.cluster}"):
            backend.down(record)
    if code != 0:
        raise LaunchError(f"training run {spec.run} failed (job exit code {code}); see `llm-atc logs {spec.cluster}`")
    return record


def train_locally(prepared: PreparedTrain, registry: Registry | None = None) -> Record:
    """Run the training script here, in the foreground, logging to ``$LLM_ATC_HOME/local/<cluster>/``."""
    spec = prepared.spec
    registry = registry or Registry()
    upload_data(prepared)
    record = _record(prepared, registry)
    log_dir = home() / "local" / spec.cluster
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "train.log"
    env = dict(os.environ)
    env.update({k: "" if v is None else str(v) for k, v in prepared.config["envs"].items()})
    env.update({k: "" if v is None else str(v) for k, v in (prepared.config.get("secrets") or {}).items()})
    env.update(spec.secrets)
    env.setdefault("WORK_DIR", str(log_dir / "work"))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    registry.update(record, status=Status.RUNNING, details={**record.details, "log": str(log_path)})
    ui.info(f"Training {spec.run} ({spec.model_type}) on this machine; log: {log_path}")
    start = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            ["bash", "-c", prepared.config["run"]], cwd=prepared.config["workdir"], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        try:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if not ui.is_quiet():
                    sys.stderr.write(line)
            code = process.wait()
        except KeyboardInterrupt:
            _kill_group(process)
            registry.update(record, status=Status.FAILED)
            raise
    if code != 0:
        registry.update(record, status=Status.FAILED)
        raise LaunchError(f"training run {spec.run} failed (exit {code}); log: {log_path}")
    registry.update(record, status=Status.SUCCEEDED)
    ui.info(f"Finished in {time.monotonic() - start:.0f}s; the model is at {spec.output_uri}")
    return record


def _kill_group(process: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
