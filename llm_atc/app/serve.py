"""``serve``, up to the launch: every check, the task rendered, the record it will become."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from llm_atc import engines, ui, weights
from llm_atc.app import adapters as adapters_app
from llm_atc.app import cost, lifecycle, resolve, serving
from llm_atc.app.lifecycle import reconcile
from llm_atc.backends import backend_for
from llm_atc.backends._base import Workload
from llm_atc.backends.local import engine_path, free_ports, pick_port
from llm_atc.errors import UserError
from llm_atc.gpu_node import NodeGpus
from llm_atc.paths import home, write_private
from llm_atc.planning import Architecture, colocate
from llm_atc.registry import Record, Registry, Status
from llm_atc.render import Colocated, LocalRun, render_serve_task, task_yaml
from llm_atc.spec import API_KEY_SECRET, ServeSpec, check_serve_options, complete_serve_spec
from llm_atc.storage import RUN_BASE, Checkpoint, check_checkpoint, download_checkpoint, store_env, store_settings

CLOUD_READY_TIMEOUT = 30 * 60
LOCAL_READY_TIMEOUT = 600


@dataclass
class PreparedServe:
    """A serve that passed every check: its workload, and what readiness needs to know."""

    spec: ServeSpec
    workload: Workload
    checkpoint: Checkpoint | None = None
    api_key: str | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)  # what the user should know before saying yes

    @property
    def yaml(self) -> str:
        return task_yaml(self.workload.config)

    @property
    def engine(self) -> str:
        return self.spec.engine

    @property
    def ready_timeout(self) -> float:
        return LOCAL_READY_TIMEOUT if self.spec.is_local else CLOUD_READY_TIMEOUT


def build_spec(*, registry: Registry, **options) -> ServeSpec:
    """``serve``'s options (the CLI's, or ``llm_atc.serve``'s) as a spec; the training runs they name are asked
    first how they are (a detached run may have finished since it was recorded)."""
    names = options.get("name")
    names = list(names) if isinstance(names, (list, tuple)) else [names] if names else []
    lifecycle.refresh_runs([*names, *(options.get("lora") or ())], registry)
    return serve_spec(registry=registry, **options)


def serve_spec(name=None, *, registry: Registry | None = None, **options) -> ServeSpec:
    """Every option checked first (``spec.check_serve_options``), then the lookups (runs, the demo model,
    ``--accelerator auto``), then the checks that need what was found."""
    request = check_serve_options(name, **options)
    models = tuple(resolve.resolve_model(n, request.source, registry) for n in request.names) or (resolve.demo_model(),)
    loras = tuple(resolve.resolve_adapter(name, ref, registry, option=f"--lora {name}=") for name, ref in request.loras)
    if not request.auto:
        return complete_serve_spec(request, models, loras)
    choice = resolve.auto_accelerators(models, **request.sizing)
    return complete_serve_spec(
        request, models, loras, auto_accelerator=choice.accelerator_text, auto_max_model_len=choice.max_model_len
    )


def prepare(spec: ServeSpec, *, registry: Registry) -> PreparedServe:
    """Check everything the serve reads, render its task, and let the backend validate it."""
    reads: dict = {}
    if spec.is_local:
        _check_name_free(spec.cluster, registry)  # before anything is read
    spec, notes = serving.resolve(spec, reads)
    if spec.is_local:
        engine, why = choose_engine(spec, reads)
        if engine == "transformers" and spec.engine != engine:  # no parsers: serve as transformers would
            asked = [kind for kind in ("tool", "reasoning") if getattr(spec, f"{kind}_parser") not in ("auto", "none")]
            if asked:
                reason = (
                    why.split(": serving")[0] if why else "vLLM is not installed here (llm-atc engines install vllm)"
                )
                raise UserError(f"--{asked[0]}_parser needs vLLM: {reason}")
            spec, notes = serving.resolve(replace(spec, engine=engine), reads)
        spec = replace(spec, engine=engine)
        notes += [why] if why else []
        prepared = _prepare_local(spec, registry)
    else:
        prepared = _prepare_cluster(spec, registry)
    prepared.notes[:0] = notes
    backend_for(prepared.workload.record).validate(prepared.workload)
    return prepared


def _prepare_cluster(spec: ServeSpec, registry: Registry) -> PreparedServe:
    from llm_atc.backends import skypilot

    several = None
    if spec.extra_models:
        ports = tuple(spec.port + 1 + i for i in range(len(spec.models) + 2))  # engines, router, its metrics
        several, notes = _colocated(spec, registry, ports=ports)
        checkpoint, adapters, stream = several.checkpoints[0], dict[str, Checkpoint](), False
    else:
        checkpoint, adapters = _check_buckets(spec)
        path = weights.for_serve(spec, checkpoint)
        notes, stream = ([path.note], path.stream) if path else ([], False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    template = write_chat_template(spec, home() / "tasks" / f"{spec.cluster}-{stamp}.jinja")
    manifest = adapters_app.service_manifest(spec, registry) if spec.engine == "vllm" else None
    config = render_serve_task(
        spec,
        checkpoint,
        features=skypilot.node_features(spec.placement),
        adapters=adapters,
        chat_template=template,
        stream=stream,
        several=several,
        adapters_manifest=manifest,
        gpus=_planned_gpus(spec),
    )
    api_key = None
    if spec.auth:
        from llm_atc import credentials

        api_key = spec.secrets.get(API_KEY_SECRET) or credentials.new_key()
        config.setdefault("secrets", {})[API_KEY_SECRET] = None
    secrets = {**spec.secrets, API_KEY_SECRET: api_key} if api_key else dict(spec.secrets)
    record = Record(
        name=spec.served_name,
        kind="serve",
        model=spec.model.location,
        cluster=spec.cluster,
        status=Status.LAUNCHING,
        cloud=spec.placement.cloud,
        region=spec.placement.region,
        accelerator=spec.placement.accelerator_text,
        checkpoint_uri=str(spec.model.bucket) if spec.model.bucket else None,
        engine=spec.engine,
        port=spec.port,
        # Without opened ports the endpoint is the head node's address (see SkyPilotBackend.endpoint).
        details={
            "open_ports": "ports" in config.get("resources", {}),
            **({"service": True} if spec.replicas is not None else {}),
            **({"private": True} if spec.private and "ports" not in config.get("resources", {}) else {}),
            **_tls_details(spec),
            **adapters_app.lora_details(spec, config, checkpoint, registry),
            **_store_details(spec),
            **_models_details(spec, several),
            **({"adapters_manifest": manifest} if manifest else {}),
            **_lifetime_details(spec),
        },
    )
    autodown, why_not = _autodown(spec)
    workload = Workload(
        record,
        config,
        secrets,
        stream=not spec.detach_setup,
        no_setup=spec.no_setup,
        down_when_done=autodown,
    )
    notes += [why_not] if why_not else []
    return PreparedServe(spec, workload, checkpoint, api_key, notes=notes + _exposure_notes(spec, record))


def _planned_gpus(spec: ServeSpec) -> NodeGpus | None:
    """The GPUs per node vLLM is started for: the fewest any accepted accelerator has, and the memory of the
    smallest (from the catalogs on disk), which the node compares with what it has before installing."""
    accelerators = spec.placement.accelerators
    if spec.engine != "vllm" or not accelerators:
        return None
    return NodeGpus(min(a.count for a in accelerators), colocate.gpu_memory([a.name for a in accelerators]))


def _lifetime_details(spec: ServeSpec) -> dict:
    """How it ends by itself, and what it costs per hour (for `status`, `bench` and the confirmation)."""

    replicas = spec.replicas.min_replicas if spec.replicas is not None else 1
    price = cost.price_of(spec, nodes=spec.num_nodes, replicas=replicas)
    return {"price": price.details(), **({"limits": spec.limits.details()} if spec.limits.details() else {})}


def _autodown(spec: ServeSpec) -> tuple[bool, str]:
    """Whether SkyPilot tears the cluster down once its engine ends (a crash, --idle_minutes, --max_hours), so
    that nothing bills until someone looks; and, where the infra cannot, the line that says so."""
    if spec.replicas is not None or spec.keep_on_failure:
        return False, ""
    from llm_atc.backends import skypilot

    why = skypilot.unsupported_feature(spec.placement.cloud, spec.placement.region, "autodown")
    if why is None:
        return True, ""
    return False, (
        f"{spec.placement.cloud} cannot tear a cluster down by itself ({why}): when the engine ends, the cluster "
        f"stays up (and bills) until `llm-atc down {spec.cluster}`"
    )


def _colocated(
    spec: ServeSpec, registry: Registry, *, ports: tuple[int, ...], available_bytes: int | None = None
) -> tuple[Colocated, list[str]]:
    """Several models: each one's bucket checked (and, here, its weights placed), where each engine goes
    on the node, and the lines that say so. ``ports``: the engines', then the router's and its metrics'."""
    checkpoints, streams, folders, notes = [], [], [], []
    for model in spec.models:
        one = replace(spec, model=model, extra_models=())
        if spec.is_local:
            folder, checkpoint, path = _local_weights(one)
        else:
            (checkpoint, _), folder = _check_buckets(one), None
            path = weights.for_serve(one, checkpoint)
        checkpoints.append(checkpoint)
        streams.append(path is not None and path.stream)
        folders.append(folder)
        notes += [f"{spec.served_name_of(model)}: {path.note}"] if path else []
    with store_env(spec.envs, spec.secrets), ui.spinner("Sizing the models for one node"):
        layout = colocate.layout_for(spec, available_bytes=available_bytes)
    count = len(spec.models)
    router, router_metrics = ports[count : count + 2]
    several = Colocated(
        layout, ports[:count], (router, router_metrics), tuple(checkpoints), tuple(streams), tuple(folders)
    )
    return several, [*notes, layout.summary]


def _models_details(spec: ServeSpec, several: Colocated | None) -> dict:
    """What each model is served for, and a deployment of several models keeps each one's name and place
    (for status, endpoint, bench and the Python API)."""
    if several is None:
        if spec.engine != "vllm":
            return {}
        return {**spec.serving_of(spec.model).details(), **({"aliases": list(spec.aliases)} if spec.aliases else {})}
    return {
        "models": [
            {
                "name": spec.served_name_of(model),
                "model": model.location,
                "engine_port": port,
                **spec.serving_of(model).details(),
            }
            for model, port in zip(spec.models, several.engine_ports, strict=True)
        ]
    }


def _store_details(spec: ServeSpec) -> dict:
    """Where the deployment's buckets are (not their keys), for later bucket calls (`adapters add`)."""
    settings = store_settings(spec.envs)
    return {"store_env": settings} if settings else {}


def _tls_details(spec: ServeSpec) -> dict:
    """What readiness and clients need to know of the endpoint's HTTPS: the certificate to trust."""
    return {"tls_cert": str(spec.tls.cert)} if spec.tls is not None else {}


def _exposure_notes(spec: ServeSpec, record: Record) -> list[str]:
    """Who can reach the endpoint, and how safely, in a line or two."""
    open_port = record.details["open_ports"]
    if spec.private:
        why = "transformers serve has none" if spec.engine == "transformers" else "--no_auth"
        return [
            f"No API key ({why}): the endpoint stays private, no port is opened. Reach it with "
            f"`llm-atc endpoint {spec.cluster} --forward`, or pass --open_port to expose it."
        ]
    if not spec.auth and open_port:
        return [f"--open_port without an API key: anyone who can reach port {spec.port} can use this endpoint."]
    if spec.auth and open_port and spec.tls is None:
        return [
            "The endpoint is plain HTTP on a public address, so its API key travels in clear text; "
            "pass --tls_cert and --tls_key for HTTPS."
        ]
    return []


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
                    raise UserError(
                        f"--cache_weights: bucket {cache.scheme}://{cache.bucket} does not exist "
                        "or is not visible to you"
                    )
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
    return write_private(path, spec.chat_template)


# --- this machine ----------------------------------------------------------------------------------


def choose_engine(spec: ServeSpec, reads: dict | None = None) -> tuple[str, str]:
    """The engine that can run the models here, and a line saying why when it is not the obvious one.

    ``auto``: vLLM when its engine environment is installed and runs here (its CPU build, or the CUDA build
    with a GPU visible) and has kernels for the models, else transformers, which only generates text. An
    engine asked for by name is used as asked; the line warns of what its first request will show."""
    found = engines.installed("vllm")
    usable = found is not None and found.usable_here()
    lacking = _cpu_kernels_lacking(spec, reads or {}) if found is not None and usable and found.build == "cpu" else None
    if spec.engine == "vllm":
        return "vllm", f"{lacking}: its first request will fail" if lacking else ""
    if spec.engine != "auto":
        return spec.engine, ""
    pooling = next((s for s in spec.servings if not s.generates), None)
    if usable and not lacking:
        return "vllm", ""
    if pooling is not None or spec.extra_models:
        if lacking:
            raise UserError(f"{lacking}, and transformers serve cannot serve this deployment; serve on a GPU node")
        why = f"serving a model for {pooling.task}" if pooling else "several --name"
        engines.require("vllm", why=f"{why} on this machine")
    return "transformers", f"{lacking}: serving with transformers serve" if lacking else ""


def _cpu_kernels_lacking(spec: ServeSpec, reads: dict) -> str:
    """Why vLLM's CPU build cannot run one of the models (its attention head size), or "". ``reads``: what
    app.serving read of each model (its config)."""

    sizes = engines.vllm_cpu_head_sizes()
    for model in spec.models:
        config = getattr(reads.get(model), "config", None)
        try:
            head = Architecture.from_config(config).head_dim if config else None
        except (UserError, TypeError, ValueError, ZeroDivisionError):
            head = None  # not a shape the planner reads: vLLM will say
        if head is None:
            continue
        if head not in sizes:
            shown = ", ".join(map(str, sizes))
            return f"vLLM's CPU build has no attention kernel for {model.name}'s head size {head} (it has {shown})"
    return ""


def _prepare_local(spec: ServeSpec, registry: Registry) -> PreparedServe:
    import shutil

    engine = spec.engine
    if spec.extra_models and engine != "vllm":
        raise UserError("several --name are served by vLLM, which is not installed here: llm-atc engines install vllm")
    vllm_env = None
    if engine == "vllm":
        why = "several --name on this machine" if spec.extra_models else "--engine vllm on this machine"
        vllm_env = engines.require("vllm", why=why, extras=bool(spec.extra_models)).path
    if engine == "transformers" and shutil.which("transformers", path=engine_path()) is None:
        raise UserError(
            "local serving needs transformers: pip install 'llm-atc[local]' (or vLLM: llm-atc engines install vllm)"
        )
    if engine == "transformers" and (spec.auth or spec.tls or spec.aliases):
        raise UserError(
            "transformers serve has no API keys, HTTPS or aliases; use --engine vllm (or drop --secret "
            "VLLM_API_KEY, --tls_cert, --tls_key and --alias)"
        )
    _check_name_free(spec.cluster, registry)
    spec = replace(spec, engine=engine, port=pick_port(spec.port))
    several = None
    if spec.extra_models:
        import psutil

        ports = free_ports(len(spec.models) + 2, besides=spec.port)
        several, notes = _colocated(spec, registry, ports=ports, available_bytes=psutil.virtual_memory().available)
        folder, checkpoint, stream = None, several.checkpoints[0], False
        offline = all(m.hub_id is None for m in spec.models)
    else:
        folder, checkpoint, path = _local_weights(spec)
        notes, stream = ([path.note], path.stream) if path else ([], False)
        offline = folder is not None or path is not None
    workdir = home() / "local" / spec.cluster
    template = write_chat_template(spec, workdir / "chat-template.jinja")
    config = render_serve_task(
        spec,
        checkpoint,
        local=LocalRun(folder, workdir, vllm_env),
        chat_template=template,
        stream=stream,
        several=several,
    )
    if offline:
        config["envs"].setdefault("HF_HUB_OFFLINE", "1")  # the weights are here or in a bucket: not on the Hub
    record = Record(
        name=spec.model.name,
        kind="serve",
        model=spec.model.location,
        cluster=spec.cluster,
        status=Status.LAUNCHING,
        cloud="local",
        checkpoint_uri=str(spec.model.bucket) if spec.model.bucket else None,
        engine=engine,
        port=spec.port,
        endpoint=f"{'https' if spec.tls else 'http'}://127.0.0.1:{spec.port}",
        details={
            "log": str(workdir / "server.log"),
            **_tls_details(spec),
            **(adapters_app.lora_details(spec, config, checkpoint, registry) if engine == "vllm" else {}),
            **_store_details(spec),
            **_models_details(spec, several),
            **_lifetime_details(spec),
        },
    )
    api_key = spec.secrets.get(API_KEY_SECRET) if spec.auth else None
    if not api_key:
        notes.append(
            "No API key: the engine listens on 127.0.0.1 only, for this machine's users "
            "(--secret VLLM_API_KEY=... gives it one)."
        )
    return PreparedServe(
        spec, Workload(record, config, dict(spec.secrets), workdir=workdir), api_key=api_key, notes=notes
    )


def _local_weights(spec: ServeSpec) -> tuple[Path | None, Checkpoint | None, weights.LoadPath | None]:
    """(the model folder on this machine, what its bucket holds, how the bucket's weights go). A
    bucket checkpoint is streamed by vLLM, or downloaded first (an adapter run's files but its
    streamed base; everything when copied)."""
    if spec.model.path is not None:
        return spec.model.path, None, None
    if spec.model.bucket is None:
        return None, None, None
    uri = spec.model.bucket
    with store_env(spec.envs, spec.secrets):
        with ui.spinner(f"Checking {uri}"):
            checkpoint = check_checkpoint(uri)
        path = weights.load_path(checkpoint, choice=spec.weights, engine=spec.engine, onto="this machine")
        if path.stream and not checkpoint.is_adapter:
            return None, checkpoint, path
        dest = home() / "cache" / uri.scheme / uri.bucket / uri.prefix
        return download_checkpoint(uri, dest, skip=f"{RUN_BASE}/*" if path.stream else ""), checkpoint, path


def _check_name_free(cluster: str, registry: Registry) -> None:

    running = [r for r in registry.records(kind="serve") if r.cluster == cluster and r.is_local and r.is_active]
    reconcile(running, registry)
    for record in running:
        if record.is_active:
            raise UserError(
                f"{cluster} is already running ({record.endpoint}); stop it with `llm-atc stop {cluster}` "
                "or pass -c NAME"
            )
