"""LoRA adapters loaded into a running vLLM deployment, without a restart (vLLM's runtime LoRA API:
``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``).

Every check is made before anything changes: the deployment serves vLLM with runtime LoRA on, the
adapter was trained on the model it serves, its rank fits, its name is free. Then the adapter's
files go to the node the way llm-atc moves model folders (rsync over SkyPilot's SSH config; a bucket
adapter is downloaded here first), vLLM loads it, and the registry records it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llm_atc import credentials, ui
from llm_atc.app import lifecycle
from llm_atc.app.lifecycle import refresh_runs
from llm_atc.app.resolve import default_bucket, resolve_adapter
from llm_atc.backends import backend_for
from llm_atc.errors import LaunchError, NotFoundError, UserError
from llm_atc.models import ModelRef
from llm_atc.options import shorten
from llm_atc.readiness import probe, trusting
from llm_atc.registry import Record, Registry, Status
from llm_atc.spec import LORA_NAME_RE, VLLM_LORA_RANKS
from llm_atc.storage import RUN_BASE, BucketURI, ObjectStore, store_env, upload_path
from llm_atc.tunnel import forward

NODE_ADAPTERS = "llm-atc/adapters"  # under the node's home: one folder per adapter name


@dataclass(frozen=True)
class Adapter:
    """An adapter as checked: what it is called, where it comes from, and its rank."""

    name: str
    ref: ModelRef
    rank: int


def same_model(text: str) -> str:
    """A model reference in the form two references to one model share: folders resolved."""
    path = Path(text).expanduser()
    return str(path.resolve()) if path.is_dir() else text


def run_base(location, registry: Registry) -> str:
    """The base a run with its own ``base/`` (at ``location``: its bucket URI or folder) was trained
    on: its training record's, else that ``base/`` copy itself."""
    where = same_model(str(location))
    for record in registry.records(kind="train"):
        if record.checkpoint_uri and same_model(record.checkpoint_uri) == where:
            return same_model(record.model)
    return same_model(f"{location}/{RUN_BASE}")


def deployment_base(spec, checkpoint, registry: Registry) -> str:
    """The model a serve spec's deployment runs, as adapters trained on it name their base."""
    model = spec.model
    if model.hub_id:
        return model.hub_id
    if model.path is not None:
        config = _adapter_config(model.path)
        if config is None:
            return same_model(str(model.path))
        base = config.get("base_model_name_or_path") or ""
        return run_base(model.path, registry) if base == RUN_BASE else same_model(base)
    if checkpoint is not None and checkpoint.is_adapter:
        return run_base(checkpoint.uri, registry) if checkpoint.base_in_run else same_model(checkpoint.base_model)
    return model.name  # a merged run: adapters trained on it name it llm-atc/<run>


def lora_details(spec, config: dict, checkpoint, registry: Registry) -> dict:
    """What a deployment's record keeps for `adapters add`: runtime LoRA's limits (as the rendered
    vLLM command has them) and the model it serves."""
    if not spec.max_loras:
        return {}
    import shlex

    command = shlex.split(config["envs"]["VLLM_COMMAND"])
    max_rank = int(command[command.index("--max-lora-rank") + 1])
    base = deployment_base(spec, checkpoint, registry)
    return {"lora": {"max_loras": spec.max_loras, "max_rank": max_rank, "base": base}}


def running_vllm(ref: str, registry: Registry, *, lacking: str) -> Record:
    """The deployment ``ref``, RUNNING on vLLM; one-line refusals otherwise (``lacking``: what transformers serve
    has not, for the message)."""
    record = registry.find(ref, kind="serve")
    lifecycle.reconcile([record], registry)
    if record.status != Status.RUNNING:
        raise UserError(f"{record.name} on {record.cluster} is {record.status}, not RUNNING; see `llm-atc status`")
    if record.engine != "vllm":
        raise UserError(f"{record.cluster} runs transformers serve, which {lacking}; serve with vLLM")
    return record


def deployment(ref: str, registry: Registry) -> Record:
    """A running vLLM deployment that can take adapters at runtime; one-line refusals otherwise."""
    record = running_vllm(ref, registry, lacking="has no LoRA adapters")
    if record.mode == "service" and not record.details.get("adapters_manifest"):
        raise UserError(
            f"{record.cluster} is a SkyServe service started without runtime LoRA; serve it again without "
            "--max_loras 0 (its replicas then load the adapters `adapters add` lists for them)"
        )
    if len(record.served) > 1:
        raise UserError(
            f"{record.cluster} serves several models ({', '.join(record.served)}); adapters are added to a "
            "deployment of one model (serve the adapter's base on its own)"
        )
    if "lora" not in record.details:
        raise UserError(
            f"{record.cluster} was started without runtime LoRA; serve it again without --max_loras 0 "
            "(vLLM on one node gets --max_loras 4 --max_lora_rank 64 by default)"
        )
    return record


def check_adapter(record: Record, name: str, ref: str, registry: Registry, store: dict | None = None) -> Adapter:
    """Resolve ``NAME=REF`` and check it against the deployment, changing nothing. ``store``: bucket
    settings and keys (``--envs``), over those the deployment was served with."""

    option = f"adapters add {shorten(name)}="
    if not LORA_NAME_RE.fullmatch(name):
        raise UserError(f"{shorten(name)} is not a valid adapter name (letters, digits, . _ / -)")
    if name in _base_names(record) or name in record.details.get("adapters", {}):
        raise _served_already(record, name)
    return checked_ref(record, name, ref, registry, store, option=option)


def checked_ref(record: Record, name: str, ref: str, registry: Registry, store: dict | None, *, option: str) -> Adapter:
    """Adapter ``ref`` to be served under ``name``: an adapter, trained on the deployment's model, of a rank it
    takes (one-line errors naming ``option``)."""

    refresh_runs([ref], registry)
    model = resolve_adapter(name, ref, registry, option=option)
    with _store(record, store):
        config = _read_adapter_config(model, option)
    lora = record.details["lora"]
    rank = int(config.get("r") or 16)
    if rank > lora["max_rank"]:
        raise UserError(
            f"{shorten(ref)} has rank {rank}, above {record.cluster}'s maximum of {lora['max_rank']}; "
            f"serve it again with --max_lora_rank {_fitting_rank(rank)}"
        )
    base = config.get("base_model_name_or_path") or ""
    base = run_base(model.bucket or model.path, registry) if base == RUN_BASE else same_model(base)
    if base != lora["base"]:
        raise UserError(f"{shorten(ref)} was trained on {base}, but {record.cluster} serves {lora['base']}")
    return Adapter(name, model, rank)


def _served_already(record: Record, name: str) -> UserError:
    return UserError(
        f"{record.cluster} already serves {name}; remove it first: llm-atc adapters remove {record.cluster} {name}"
    )


def _fitting_rank(rank: int) -> int:
    """The smallest ``--max_lora_rank`` vLLM accepts that fits ``rank``."""

    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def check_training(spec, registry: Registry) -> Record:
    """``train --serve_on``: the deployment can take this run's adapter (checked before training)."""
    from llm_atc.recipes_catalog import get_recipe

    record = deployment(spec.serve_on, registry)
    lora = record.details["lora"]
    base = spec.base_model if spec.base_bucket else same_model(spec.base_model)
    if base != lora["base"]:
        raise UserError(f"--serve_on {record.cluster} serves {lora['base']}, but this run trains on {base}")
    rank = int(spec.envs.get("LORA_R") or get_recipe(f"train/{spec.model_type}").load()["envs"].get("LORA_R", 16))
    if rank > lora["max_rank"]:
        raise UserError(
            f"--serve_on {record.cluster} takes adapters up to rank {lora['max_rank']}; this run trains rank "
            f"{rank} (--envs LORA_R={lora['max_rank']}, or serve it with --max_lora_rank {_fitting_rank(rank)})"
        )
    name = f"llm-atc/{spec.run}"
    if name in record.details.get("adapters", {}):
        raise _served_already(record, name)
    return record


def serve_run_on(run: str, deployment_ref: str, registry: Registry, store: dict | None = None) -> Record:
    """Load finished run ``run``'s adapter into a deployment, as ``llm-atc/<run>``; the deployment's record.
    ``store``: the bucket settings and keys the run was trained with (default: its record's settings)."""
    record = deployment(deployment_ref, registry)
    if store is None:
        store = registry.find(run, kind="train").details.get("store_env") or {}
    name = f"llm-atc/{run}"
    return add(record, check_adapter(record, name, name, registry, store), registry, store)


@contextmanager
def _store(record: Record, store: dict | None) -> Iterator[None]:
    """Bucket calls with the settings the deployment was served with, and ``store`` over them."""

    with store_env(record.details.get("store_env") or {}, store or {}):
        yield


def add(record: Record, adapter: Adapter, registry: Registry, store: dict | None = None) -> Record:
    """Load a checked adapter into the running engine; the updated record."""

    api_key = credentials.get(record.cluster)
    if record.mode == "service":
        with _store(record, store):
            path = _publish(record, adapter)
        return _record(
            record, registry, {adapter.name: {"ref": adapter.ref.location, "path": path, "rank": adapter.rank}}
        )
    with reach(record, registry) as base_url:
        loaded = served(base_url, record, api_key)
        if adapter.name in loaded:
            raise _served_already(record, adapter.name)
        with _store(record, store):
            path = _place(record, adapter)
        with ui.spinner(f"Loading {adapter.name} into {record.cluster}"):
            status, text = _post(
                base_url + "/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": path}, api_key, record
            )
        if status != 200:
            raise LaunchError(f"vLLM on {record.cluster} did not load {adapter.name} ({status}): {_message(text)}")
    return _record(record, registry, {adapter.name: {"ref": adapter.ref.location, "path": path, "rank": adapter.rank}})


def _record(record: Record, registry: Registry, added: dict | None = None, removed: str | None = None) -> Record:
    """The deployment's record with ``added`` adapters and without ``removed``."""
    adapters = {k: v for k, v in {**record.details.get("adapters", {}), **(added or {})}.items() if k != removed}
    return registry.update(record, details={**record.details, "adapters": adapters})


def remove(record: Record, name: str, registry: Registry) -> Record:
    """Unload ``name`` from the running engine; the updated record."""

    api_key = credentials.get(record.cluster)
    if record.mode == "service":
        with _store(record, None):
            _unpublish(record, name)
        return _record(record, registry, removed=name)
    with reach(record, registry) as base_url:
        loaded = served(base_url, record, api_key)
        base_names = _base_names(record)
        if name not in loaded or name in base_names:
            shown = ", ".join(n for n in loaded if n not in base_names) or "none"
            raise NotFoundError(f"{record.cluster} serves no adapter {shorten(name)} (adapters: {shown})")
        status, text = _post(base_url + "/v1/unload_lora_adapter", {"lora_name": name}, api_key, record)
        if status != 200:
            raise LaunchError(f"vLLM on {record.cluster} did not unload {name} ({status}): {_message(text)}")
    return _record(record, registry, removed=name)


def listing(record: Record, registry: Registry) -> list[tuple[str, str]]:
    """(name, where it came from) of every adapter the engine serves now (see :func:`standing` for versions)."""

    if record.mode == "service":
        with _store(record, None):
            listed = _manifest(record)
        return [(name, entry.get("uri") or entry.get("hub") or "") for name, entry in listed.items()]
    with reach(record, registry) as base_url:
        loaded = served(base_url, record, credentials.get(record.cluster))
    added = record.details.get("adapters", {})
    base_names = _base_names(record)
    return [
        (name, added[name]["ref"] if name in added else "--lora at start")
        for name in loaded
        if name not in base_names and not name.endswith(f"/{RUN_BASE}")
    ]


def standing(record: Record, name: str) -> tuple[str, str]:
    """(the version ``llm-atc promote`` put behind ``name``, its held-out loss as last measured); "" for none."""
    entry = record.details.get("adapters", {}).get(name) or {}
    version = f"v{entry['version']}" if "version" in entry else ""
    score = record.details.get("scores", {}).get(name)
    return version, f"{score['nll']:.4f} ({score.get('data', '')})" if score else ""


def _base_names(record: Record) -> set[str]:
    """The names the deployment's own model answers to (not adapters): its name and its aliases."""
    return {record.name, *record.details.get("aliases", ())}


@contextmanager
def reach(record: Record, registry: Registry) -> Iterator[str]:
    """The engine's base URL (``http://HOST:PORT``), through an SSH tunnel for a private endpoint."""
    _, url = lifecycle.endpoint(record, registry=registry)
    if not record.details.get("private"):
        yield url.rstrip("/")
        return

    with forward(record) as tunnel:
        yield tunnel.endpoint.rstrip("/")


def served(base_url: str, record: Record, api_key: str | None) -> list[str]:
    """The model names the engine answers to now (its base model and its adapters)."""
    return list(served_from(base_url, record, api_key))


def served_from(base_url: str, record: Record, api_key: str | None) -> dict[str, str]:
    """Each model name the engine answers to now, and where vLLM loaded it from (``root``)."""

    status, body = probe(base_url + "/v1/models", api_key=api_key, cafile=record.details.get("tls_cert"))
    if status != 200:
        raise LaunchError(f"{base_url}/v1/models answered {status or 'nothing'}; is {record.cluster} up?")
    return {model["id"]: model.get("root") or "" for model in json.loads(body).get("data", [])}


def _place(record: Record, adapter: Adapter) -> str:
    """The adapter's files where the engine reads them; the path (or Hub id) vLLM is given."""
    ref = adapter.ref
    if ref.hub_id:
        return ref.hub_id  # vLLM fetches a Hub adapter itself
    if ref.bucket is not None:
        from llm_atc.paths import home
        from llm_atc.storage import download_checkpoint

        uri = ref.bucket
        folder = download_checkpoint(uri, home() / "cache" / uri.scheme / uri.bucket / uri.prefix, skip=f"{RUN_BASE}/*")
    else:
        folder = ref.folder
    safe = adapter.name.replace("/", "--")
    with ui.spinner(f"Copying {adapter.name} to {record.cluster}"):
        return backend_for(record).put_folder(record, folder, f"{NODE_ADAPTERS}/{safe}")


# --- SkyServe services: a manifest in a bucket that every replica follows (recipes/train/buckets.py adapters) ---

SERVICE_WAIT = 600  # seconds for the ready replicas to load (or unload) an adapter
SERVICE_POLL = 2.0


def service_manifest(spec, registry: Registry) -> str | None:
    """Where a SkyServe service's runtime adapters are listed: ``llm-atc/services/<service>/adapters.json`` in
    the user's default bucket of the cloud's store (GCS on gcp, else S3; created when the first adapter is
    added). None for a service without runtime LoRA."""
    if spec.replicas is None or not spec.max_loras:
        return None
    store, bucket = default_bucket(spec.placement.cloud, registry)
    return f"{'gs' if store == 'GCS' else 's3'}://{bucket}/llm-atc/services/{spec.cluster}/adapters.json"


def _manifest(record: Record) -> dict[str, dict]:
    """The adapters the service's manifest lists now, by name."""

    uri = BucketURI.parse(record.details["adapters_manifest"])
    store = ObjectStore(uri.scheme)
    if not store.bucket_exists(uri.bucket):
        return {}
    try:
        return json.loads(store.read_text(uri)).get("adapters", {})
    except NotFoundError:
        return {}


def _service_folder(record: Record):
    """The service's folder in the bucket (the manifest and uploaded adapters); the bucket is created if needed."""

    manifest = BucketURI.parse(record.details["adapters_manifest"])
    store = ObjectStore(manifest.scheme)
    if not store.bucket_exists(manifest.bucket):
        with ui.spinner(f"Creating bucket {manifest.scheme}://{manifest.bucket}"):
            store.create_bucket(manifest.bucket)
    return BucketURI.parse(str(manifest).rsplit("/", 1)[0]), store


def _write_manifest(record: Record, adapters: dict[str, dict]) -> None:
    import tempfile

    folder_uri, store = _service_folder(record)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "adapters.json"
        path.write_text(json.dumps({"adapters": adapters}, indent=1))
        store.upload(path, folder_uri.child("adapters.json"), lambda _: None)


def _publish(record: Record, adapter: Adapter) -> str:
    """List ``adapter`` in the service's manifest (a folder is uploaded beside it first) and wait until every
    ready replica serves it; where replicas load it from."""

    listed = _manifest(record)
    if adapter.name in listed:
        raise _served_already(record, adapter.name)
    ref = adapter.ref
    if ref.hub_id:
        entry = {"hub": ref.hub_id}
    elif ref.bucket is not None:
        entry = {"uri": str(ref.bucket)}
    else:
        uri = _service_folder(record)[0].child("adapters", adapter.name.replace("/", "--"))
        upload_path(ref.folder, uri)
        entry = {"uri": str(uri)}
    _write_manifest(record, {**listed, adapter.name: entry})
    wait_replicas(record, adapter.name, present=True)
    return entry.get("uri") or entry["hub"]


def _unpublish(record: Record, name: str) -> None:
    listed = _manifest(record)
    if name not in listed:
        shown = ", ".join(listed) or "none"
        raise NotFoundError(f"{record.cluster} lists no adapter {shorten(name)} (adapters: {shown})")
    _write_manifest(record, {k: v for k, v in listed.items() if k != name})
    wait_replicas(record, name, present=False)


def wait_replicas(record: Record, name: str, *, present: bool, source: str | None = None) -> None:
    """Until every ready replica serves ``name`` (or no longer does; or serves it from ``source``); bounded,
    with progress."""
    import time

    replicas = backend_for(record).ready_replicas(record)
    what = "load" if present else "unload"
    if not replicas:
        ui.info(f"{record.cluster} has no ready replica now; each replica {what}s {name} when it starts.")
        return
    api_key, start = credentials.get(record.cluster), time.monotonic()
    with ui.spinner(f"Waiting for {len(replicas)} replica(s) of {record.cluster} to {what} {name}") as spinner:
        while True:
            pending = [rid for rid, url in replicas if _serves(url, name, api_key, source) != present]
            if not pending:
                break
            elapsed = time.monotonic() - start
            if elapsed > SERVICE_WAIT:
                raise LaunchError(
                    f"replica(s) {', '.join(map(str, pending))} of {record.cluster} did not {what} {name} within "
                    f"{SERVICE_WAIT}s (it stays listed; see `llm-atc logs {record.cluster}`)"
                )
            spinner.update(elapsed, f"{len(replicas) - len(pending)} of {len(replicas)} done")
            time.sleep(SERVICE_POLL)
    ui.info(f"{name}: {what}ed by {len(replicas)} ready replica(s); replicas started later {what} it too.")


def _serves(url: str, name: str, api_key: str | None, source: str | None = None) -> bool | None:
    """Whether the replica at ``url`` lists ``name`` (loaded from ``source``, when given); None when it does not
    answer."""
    from llm_atc.recipes.train.buckets import adapter_folder

    status, body = probe(url.rstrip("/") + "/v1/models", api_key=api_key)
    if status != 200:
        return None
    roots = {model["id"]: model.get("root") or "" for model in json.loads(body).get("data", [])}
    if source is None or name not in roots:
        return name in roots
    return roots[name] == source or roots[name].endswith(adapter_folder(name, source))


def _read_adapter_config(model: ModelRef, option: str) -> dict:
    """adapter_config.json of a bucket, folder or Hub adapter; one-line errors."""
    if model.bucket is not None:
        from llm_atc.storage import check_checkpoint

        checkpoint = check_checkpoint(model.bucket)
        if not checkpoint.is_adapter:
            raise UserError(
                f"{option}{model.bucket} holds a full model, not a LoRA adapter (train with --envs MERGE=0)"
            )
        return {"r": checkpoint.rank, "base_model_name_or_path": checkpoint.base_model}
    if model.path is not None:
        config = _adapter_config(model.path)
        if config is None:
            raise UserError(f"{option}{model.path} holds no adapter_config.json (not a LoRA adapter)")
        return config
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model.repo, "adapter_config.json")).read_text())
    except Exception as exc:
        raise UserError(
            f"{option}{model.hub_id}: cannot read its adapter_config.json from the Hub ({type(exc).__name__})"
        ) from None


def _adapter_config(folder: Path) -> dict | None:
    config = folder / "adapter_config.json"
    if (folder / "config.json").is_file() or not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{config}: not readable JSON ({exc})") from None


def _post(url: str, body: dict, api_key: str | None, record: Record) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=600, context=trusting(record.details.get("tls_cert"))) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, (exc.read() or b"").decode(errors="replace")
    except OSError as exc:
        raise LaunchError(f"{url}: {exc}") from None


def _message(text: str) -> str:
    """vLLM's error message out of its JSON reply, on one line."""
    try:
        data = json.loads(text)
        text = (data.get("error") or {}).get("message") or data.get("message") or text
    except (ValueError, AttributeError):
        pass
    return " ".join(str(text).split())[:400]
