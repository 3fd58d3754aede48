"""The lookups a spec needs once its options are checked: trained runs in the registry, the built-in demo
model, ``--accelerator auto`` against SkyPilot's catalog, and the user's default bucket.

``spec`` checks what the options say without any of these; ``app.serve`` and ``app.train`` call it first, then
these, then ``spec`` again with what was found (see ``app.serve.build_spec``).
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path

from llm_atc import demo, planning, ui
from llm_atc.bucket_uri import RUN_PREFIX, BucketURI
from llm_atc.errors import NotFoundError, UserError
from llm_atc.models import ModelRef, check_run_name, is_dir, parse_model
from llm_atc.options import shorten
from llm_atc.planning import colocate
from llm_atc.registry import Registry, Status


def resolve_model(
    name: str, source: str | None = None, registry: Registry | None = None, *, option: str = "--name"
) -> ModelRef:
    """Resolve ``--name``/``--source`` (or another option's model reference) into a :class:`ModelRef`:
    ``llm-atc/<run>`` from the registry, ``llm-atc-demo`` built here, the rest as ``models.parse_model`` reads
    them (no network access)."""
    stripped = name.strip()
    if not source and stripped.startswith(RUN_PREFIX + "/"):
        return _trained_run(stripped, registry or Registry(), option)
    if not source and stripped == demo.DEMO_NAME and not is_dir(Path(stripped)):  # the built-in tiny model
        return ModelRef(name=stripped, path=demo.demo_model())
    return parse_model(name, source, option=option)


def _trained_run(name: str, registry: Registry, option: str) -> ModelRef:
    """``llm-atc/<run>``: the model a recorded run published (refused until it has)."""
    run = check_run_name(name.split("/", 1)[1], option=option)
    record = registry.find_run(run)
    if record is None:
        raise NotFoundError(
            f"{option} {name} is not in the registry; pass --source s3://BUCKET/{RUN_PREFIX}/{run} "
            f"(or gs://...) to say where its checkpoint is"
        )
    if record.status != Status.SUCCEEDED:  # (app.lifecycle.refresh_runs has asked an active run how it is)
        what = "not finished yet" if record.is_active else "over without publishing one"
        raise UserError(
            f"{option} {name}: the training run is {record.status}, so there is no model to serve "
            f"({what}); see `llm-atc status {run}`"
        )
    uri = record.checkpoint_uri
    if not uri:
        raise NotFoundError(f"{option} {name}: the registry holds no checkpoint for it; pass --source")
    if "://" not in uri:
        return ModelRef(name=name, path=Path(uri))
    return ModelRef(name=name, bucket=BucketURI.parse(uri))


def resolve_adapter(name: str, ref: str, registry: Registry | None = None, *, option: str) -> ModelRef:
    """An adapter ``ref`` (llm-atc/<run>, an s3:// or gs:// folder, a local folder or a Hub id) served as ``name``."""
    if "://" in ref:
        return resolve_model(name, ref, registry, option=option)
    return replace(resolve_model(ref, None, registry, option=option), name=name)


def demo_model() -> ModelRef:
    """The embedded demo model (``serve --cloud local`` without ``--name``)."""
    ui.info(f"No --name: serving the built-in demo model as {demo.DEMO_NAME} (tiny, random weights).")
    return ModelRef(name=demo.DEMO_NAME, path=demo.demo_model())


def auto_accelerators(models: tuple[ModelRef, ...] | ModelRef | str, **options) -> planning.AutoChoice:
    """``--accelerator auto``: the GPUs that fit the model(s), from SkyPilot's catalog (see ``llm-atc plan``)."""
    several = isinstance(models, tuple) and len(models) > 1
    with ui.spinner(f"Sizing the model{'s' if several else ''} against SkyPilot's GPU catalog"):
        if several:
            options.pop("mode")
            choice = colocate.auto_accelerators(models, **options)
        else:
            choice = planning.auto_accelerators(models[0] if isinstance(models, tuple) else models, **options)
    ui.info(
        f"--accelerator auto: {choice.accelerator_text}"
        + (f" on {choice.num_nodes} nodes" if choice.num_nodes > 1 else "")
    )
    return choice


def default_bucket(cloud: str | None, registry: Registry) -> tuple[str, str]:
    """(store, bucket): the user's own bucket in the cloud's store (GCS on gcp, else S3), named once and
    remembered in the registry; created where it is first written to."""
    store = "GCS" if (cloud or "").strip().lower() == "gcp" else "S3"
    name, _ = registry.setting(f"default_bucket.{store}", f"llm-atc-{secrets.token_hex(4)}")
    return store, name


def base_model(base: str, registry: Registry) -> tuple[str, str | None]:
    """``train --base_model`` that is a run, a folder or the demo model: (what the node loads, or the bucket
    that holds it). A Hub id needs no lookup (``spec.base_needs_lookup``)."""
    ref = resolve_model(base, None, registry, option="--base_model")
    if ref.hub_id:
        return ref.hub_id, None
    if ref.path is not None:
        if not (ref.path / "config.json").is_file():
            raise UserError(
                f"--base_model {shorten(base)} holds no config.json: a LoRA adapter is trained from its "
                "base (or from a run trained with the default MERGE=1)"
            )
        return str(ref.path), None
    return base, str(ref.bucket)
