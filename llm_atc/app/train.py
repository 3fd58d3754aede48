"""``train``, up to the launch: the name, the bucket and the data checked, the task rendered.

The data checks use the very functions the training script runs on the node
(``recipes/train/finetune.py``), so what passes here loads there.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from llm_atc import ui
from llm_atc.app import cost, resolve
from llm_atc.app.adapters import serve_run_on
from llm_atc.app.lifecycle import reconcile, refresh_runs
from llm_atc.backends import backend_for
from llm_atc.backends._base import Workload
from llm_atc.errors import NotFoundError, UserError
from llm_atc.hub import HubUnreachable, hub_file, hub_token
from llm_atc.models import ModelRef, looks_like_path
from llm_atc.paths import home
from llm_atc.registry import Record, Registry, Status
from llm_atc.render import NodeFeatures, render_train_task, task_yaml
from llm_atc.spec import TrainSpec, check_train_options, complete_train_spec
from llm_atc.storage import (
    BucketURI,
    ObjectStore,
    StoreUnreachable,
    download_checkpoint,
    store_env,
    store_settings,
    upload_path,
)


def validate_data(data: str) -> dict:
    """Read and check every record of the data (downloading it first from a bucket)."""
    from llm_atc.recipes.train import finetune

    if "://" in data:
        uri = BucketURI.parse(data, option="--finetune_data")
        store = ObjectStore(uri.scheme)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / (Path(uri.prefix).name or "data")
            with ui.spinner(f"Reading {data}"):
                try:
                    store.download(uri, local, lambda n: None)
                except NotFoundError:
                    raise NotFoundError(f"--finetune_data {data}: no such object (or no such bucket)") from None
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
    """A run that passed every check: its workload, the data URI the node reads, and the data's summary."""

    spec: TrainSpec
    workload: Workload
    data_uri: str
    summary: dict

    @property
    def yaml(self) -> str:
        return task_yaml(self.workload.config)


def build_spec(*, registry: Registry, **options) -> TrainSpec:
    """``train``'s options (the CLI's, or ``llm_atc.train``'s) as a spec; a training run given as the base is
    asked first how it is."""

    refresh_runs([options.get("base_model") or ""], registry)
    return train_spec(registry=registry, **options)


def train_spec(*, registry: Registry | None = None, **options) -> TrainSpec:
    """Every option checked first (``spec.check_train_options``), then the lookups (the default bucket, a base
    that is a run or a folder, ``--accelerator auto``), then the spec."""
    request = check_train_options(**options)
    registry = registry or Registry()
    store, bucket = resolve.default_bucket(request.sizing["cloud"], registry) if request.store is None else (None, None)
    base, base_bucket = (
        resolve.base_model(request.base, registry) if request.base_needs_lookup else (request.base, None)
    )
    if not request.auto:
        return complete_train_spec(request, base=base, base_bucket=base_bucket, store=store, bucket=bucket)
    sized = ModelRef(name=request.base, bucket=BucketURI.parse(base_bucket)) if base_bucket else base
    choice = resolve.auto_accelerators(sized, **request.sizing)
    return complete_train_spec(
        request,
        base=base,
        base_bucket=base_bucket,
        store=store,
        bucket=bucket,
        auto_accelerator=choice.accelerator_text,
        auto_num_nodes=choice.num_nodes,
    )


def serve_when_done(spec: TrainSpec, registry: Registry) -> Record | None:
    """``--serve_on``: the finished run's adapter loaded into that running deployment; the deployment's record
    (None without ``--serve_on``). The CLI and ``llm_atc.train`` both end with it."""
    if not spec.serve_on:
        return None

    return serve_run_on(spec.run, spec.serve_on, registry, store={**spec.envs, **spec.secrets})


def prepare(spec: TrainSpec, *, registry: Registry, keep_cluster: bool = False, dryrun: bool = False) -> PreparedTrain:
    """Check the name (or the run to resume), the bucket and the data; render the task; let the
    backend validate it. ``dryrun``: a bucket that cannot be asked from here (no credentials, no connection)
    is one line saying so, not an error: the task is shown all the same."""
    if spec.serve_on:
        from llm_atc.app import adapters

        adapters.check_training(spec, registry)
    with store_env(spec.envs, spec.secrets):
        spec = _check_name(spec, registry)
        output = None if "://" not in spec.output_uri else BucketURI.parse(spec.output_uri)
        summary: dict = {}
        if output is not None:
            _unless_unreachable(dryrun, _check_output, spec, output)
        elif any((Path(spec.output_uri) / marker).is_file() for marker in ("config.json", "adapter_config.json")):
            raise UserError(f"{spec.output_uri} already holds a model; pick another --name")
        summary = _unless_unreachable(dryrun, validate_data, spec.data) or {}
    if summary:
        ui.info(
            f"Data OK: {summary['conversations']} conversations, {summary['turns']} turns "
            f"({summary['assistant_turns']} assistant turns)"
        )
    data_uri = spec.data
    if spec.data_is_local and output is not None:
        data_uri = str(output.child("data", Path(spec.data).name))
    mode = "local" if spec.is_local else "managed" if spec.placement.use_spot else "cluster"
    check_hub_base(spec)
    if mode == "local":
        preflight_local(spec)
        spec = _local_base(spec)
        features = NodeFeatures()
    else:
        from llm_atc.backends import skypilot

        features = skypilot.node_features(spec.placement)
    config = render_train_task(spec, data=data_uri, features=features)
    workdir = home() / "local" / spec.cluster
    if mode == "local":
        config["envs"].setdefault("WORK_DIR", str(workdir / "work"))
    record = Record(
        name=spec.run,
        kind="train",
        model=spec.base_model,
        cluster=spec.cluster,
        status=Status.LAUNCHING,
        cloud=spec.placement.cloud,
        region=spec.placement.region,
        accelerator=spec.placement.accelerator_text or None,
        checkpoint_uri=spec.output_uri,
        details={
            "model_type": spec.model_type,
            "description": spec.description,
            "data": data_uri,
            "store_env": store_settings(spec.envs),
            "eval_fraction": float(config["envs"].get("EVAL_FRACTION") or 0),
            **({"managed": True} if mode == "managed" else {}),
            **({"log": str(workdir / "train.log")} if mode == "local" else {}),
            "price": cost.price_of(spec, nodes=spec.num_nodes).details(),
            **({"limits": spec.limits.details()} if spec.limits.details() else {}),
        },
    )
    workload = Workload(
        record,
        config,
        dict(spec.secrets),
        stream=not spec.detach_setup,
        no_setup=spec.no_setup,
        down_when_done=mode == "cluster" and not keep_cluster,
        workdir=Path(config["workdir"]) if mode == "local" else None,
    )
    backend_for(record).validate(workload)
    return PreparedTrain(spec, workload, data_uri, summary)


def _unless_unreachable(dryrun: bool, check, *args):
    """``check(*args)``; in a dry run, a store that cannot be asked from here is a line instead of an error."""
    try:
        return check(*args)
    except StoreUnreachable as exc:
        if not dryrun:
            raise
        ui.warn(f"not checked in this dry run: {exc}")
        return None


def _check_name(spec: TrainSpec, registry: Registry) -> TrainSpec:
    """A run's name is free unless a run of that name is recorded (and not torn down); ``--resume``
    continues such a run where it stopped, in the same place."""

    earlier = [r for r in registry.records(kind="train") if r.name == spec.run and r.status != Status.DOWN]
    reconcile(earlier, registry)
    if not earlier:
        if spec.resume:
            raise NotFoundError(f"--resume: no training run named {spec.run!r} to resume; see `llm-atc list`")
        return spec
    last = earlier[0]
    if last.is_active:
        raise UserError(
            f"training run {spec.run!r} is {last.status} on {last.cluster}; follow it with `llm-atc logs {spec.run}`"
        )
    if not spec.resume:
        hint = (
            "add --resume to continue it from its last checkpoint, or "
            if last.status != Status.SUCCEEDED
            else f"serve it with `llm-atc serve --name llm-atc/{spec.run}`, or "
        )
        raise UserError(
            f"a training run named {spec.run!r} exists ({last.status}); {hint}"
            f"`llm-atc down {spec.run}` to free the name"
        )
    if last.status == Status.SUCCEEDED:
        raise UserError(f"--resume: training run {spec.run!r} already finished; its model is at {last.checkpoint_uri}")
    if last.checkpoint_uri != spec.output_uri:
        raise UserError(
            f"--resume: {spec.run!r} wrote to {last.checkpoint_uri}; resume it with the same "
            "--checkpoint_bucket and --checkpoint_store (or none for a local run)"
        )
    ui.info(f"Resuming {spec.run} from its last checkpoint under {last.checkpoint_uri}")
    return replace(spec, cluster=last.cluster)


def _check_output(spec: TrainSpec, output: BucketURI) -> None:
    store = ObjectStore(output.scheme)
    with ui.spinner(f"Checking {output.scheme}://{output.bucket}"):
        exists = store.bucket_exists(output.bucket)
        if not exists and spec.default_bucket:
            ui.info(
                f"No --checkpoint_bucket: runs go to your default bucket {output.scheme}://{output.bucket} "
                f"({output.store}, from --cloud), created on first use and used by your next runs too."
            )
            return
        if not exists:
            raise NotFoundError(f"--checkpoint_bucket {output.bucket} does not exist or is not visible to you")
        if any(key in ("config.json", "adapter_config.json") for key, *_ in store.list_objects(output)):
            raise UserError(f"{output} already holds a model; pick another --name")


def check_hub_base(spec: TrainSpec) -> None:
    """A base model from the Hugging Face Hub exists and this token may read it (its config answers). Here it
    must also be reachable: a run on this machine downloads it; a node downloads it itself, so from a machine
    offline a cloud run goes ahead, said in one line."""

    base = spec.base_model
    if spec.base_bucket is not None or looks_like_path(base) or Path(base).is_dir():
        return
    try:
        with ui.spinner(f"Checking {base} on the Hugging Face Hub"), hub_token(spec.secrets):
            hub_file(base, "config.json")
    except HubUnreachable as exc:
        if spec.is_local:
            raise UserError(
                f"--base_model {base}: {str(exc).split(': ', 1)[1].split(';')[0]}; train on a model folder, "
                "llm-atc/<run>, or llm-atc-demo (a tiny built-in model, no network needed)"
            ) from None
        ui.info(f"Could not check {base} on the Hugging Face Hub from here (offline?); the node downloads it.")
    except UserError as exc:
        raise UserError(f"--base_model {base}: {str(exc).split(': ', 1)[1]}") from None


# What a local run imports; `pip install 'llm-atc[train]'` brings them.
TRAIN_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


def _missing(module: str) -> bool:
    import importlib.util
    import sys

    if module in sys.modules:
        return sys.modules[module] is None  # blocked
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def preflight_local(spec: TrainSpec) -> None:
    """What a run on this machine needs, checked before it starts (not after the model has loaded)."""
    missing = [m for m in TRAIN_PACKAGES if _missing(m)]
    if missing:
        raise UserError(f"training on this machine needs {', '.join(missing)}: pip install 'llm-atc[train]'")
    if spec.secrets.get("WANDB_API_KEY") and _missing("wandb"):
        raise UserError(
            "WANDB_API_KEY asks for Weights & Biases logging, and wandb is not installed here: "
            "pip install wandb (or drop WANDB_API_KEY)"
        )


def _local_base(spec: TrainSpec) -> TrainSpec:
    """A base published in a bucket (``--base_model llm-atc/<run>``), downloaded for a run here."""
    if spec.base_bucket is None:
        return spec

    uri = BucketURI.parse(spec.base_bucket)
    with store_env(spec.envs, spec.secrets):
        folder = download_checkpoint(uri, home() / "cache" / uri.scheme / uri.bucket / uri.prefix)
    return replace(spec, base_model=str(folder), base_bucket=None)


def create_default_bucket(spec: TrainSpec) -> None:
    """The user's default bucket, made on the first run that needs it."""
    output = BucketURI.parse(spec.output_uri)
    store = ObjectStore(output.scheme)
    with store_env(spec.envs, spec.secrets):
        if store.bucket_exists(output.bucket):
            return
        with ui.spinner(f"Creating {output.scheme}://{output.bucket}"):
            store.create_bucket(output.bucket)
    ui.info(f"Created {output.scheme}://{output.bucket}, your default bucket for runs (kept for the next ones).")


def upload_data(prepared: PreparedTrain) -> None:
    """Put a local data file next to the run in its bucket, where the node reads it."""
    spec = prepared.spec
    if spec.default_bucket:
        create_default_bucket(spec)
    if spec.data_is_local and prepared.data_uri != spec.data:
        target = BucketURI.parse(prepared.data_uri)
        folder = BucketURI(target.scheme, target.bucket, target.prefix.rsplit("/", 1)[0])
        with store_env(spec.envs, spec.secrets):
            upload_path(Path(spec.data), folder)
        ui.info(f"Uploaded {spec.data} to {prepared.data_uri}")
