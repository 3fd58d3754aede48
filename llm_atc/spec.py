"""Typed specs built from CLI options or Python API arguments, validated up front."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from llm_atc import gpus, model_tasks
from llm_atc.bucket_uri import BucketURI
from llm_atc.errors import NotFoundError, UserError
from llm_atc.model_tasks import Serving
from llm_atc.models import HUB_ID_RE, ModelRef, check_run_name, looks_like_path
from llm_atc.options import (
    Accelerator,
    canonical_infra,
    check_cluster_name,
    check_number,
    check_port,
    check_resource_amount,
    cluster_name_for,
    parse_accelerators,
    parse_env_pairs,
    parse_extra_args,
    read_text_file,
    shorten,
    split_envs_and_secrets,
)
from llm_atc.paths import home
from llm_atc.recipes.train.contract import MODEL_TYPES
from llm_atc.vllm_flags import DTYPES, QUANTIZATIONS, check_vllm_args
from llm_atc.weights import check_choice, check_source

LOCAL = "local"
ENGINES = ("auto", "vllm", "transformers")
DEFAULT_ACCELERATOR = "A100:1"
API_KEY_SECRET = "VLLM_API_KEY"  # vLLM's OpenAI server reads its --api-key from this variable
DEFAULT_PORT = 8000


@dataclass(frozen=True)
class Placement:
    """Where a task runs: SkyPilot infra (cloud/region/zone) and its resources."""

    cloud: str | None = None
    region: str | None = None
    zone: str | None = None
    accelerators: tuple[Accelerator, ...] = ()
    use_spot: bool = False
    disk_size: int | None = None
    cpus: str | None = None
    memory: str | None = None

    @property
    def infra(self) -> str | None:
        """SkyPilot 0.14's ``infra`` string, e.g. ``gcp/us-central1/us-central1-a``."""
        if not self.cloud:
            return None
        return "/".join(p for p in (self.cloud, self.region, self.zone) if p)

    @property
    def accelerator_text(self) -> str:
        return ",".join(str(a) for a in self.accelerators)

    @property
    def resources_text(self) -> str:
        """What is asked for, for messages: ``A100:1``, ``cpus=1, memory=8+`` or ``default resources``."""
        asked = [self.accelerator_text] if self.accelerators else []
        asked += [f"{key}={value}" for key, value in (("cpus", self.cpus), ("memory", self.memory)) if value]
        return ", ".join(asked) or "the recipe's default resources"


@dataclass(frozen=True)
class Limits:
    """How a launch ends by itself, besides `llm-atc down`: ``idle_minutes`` without a request (serving),
    ``max_hours`` in all."""

    idle_minutes: float | None = None
    max_hours: float | None = None

    def text(self, otherwise: str = "when you run `llm-atc down`") -> str:
        """``after 30 idle minutes or 8 hours``, else ``otherwise``."""
        parts = [f"{self.idle_minutes:g} idle minutes"] if self.idle_minutes else []
        parts += [f"{self.max_hours:g} hours"] if self.max_hours else []
        return f"after {' or '.join(parts)}" if parts else otherwise

    def details(self) -> dict[str, float]:
        return {k: v for k, v in (("idle_minutes", self.idle_minutes), ("max_hours", self.max_hours)) if v}


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """What every launch has: a cluster, where it runs, envs/secrets and launch flags."""

    cluster: str
    placement: Placement
    envs: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    detach_setup: bool = False
    detach_run: bool = False
    no_setup: bool = False
    limits: Limits = Limits()
    price_per_hour: float | None = None  # --price_per_hour: what it costs, where the catalog does not say

    @property
    def is_local(self) -> bool:
        return self.placement.cloud == LOCAL


@dataclass(frozen=True)
class TLS:
    """A certificate and its private key (PEM files on this machine)."""

    cert: Path
    key: Path


TLS_MAX_BYTES = 64 * 1024


def read_tls(cert: str | None, key: str | None, *, engine: str) -> TLS | None:
    """``--tls_cert``/``--tls_key``: both or neither; PEM files holding what their names say."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise UserError("--tls_cert and --tls_key go together: the certificate and its private key (PEM files)")
    if engine == "transformers":
        raise UserError("--tls_cert and --tls_key apply to --engine vllm (transformers serve has no HTTPS)")
    for option, value, marker, what in (
        ("--tls_cert", cert, "-----BEGIN CERTIFICATE-----", "certificate"),
        ("--tls_key", key, "PRIVATE KEY-----", "private key"),
    ):
        if marker not in read_text_file(value, option=option, max_bytes=TLS_MAX_BYTES):
            raise UserError(f"{option} {shorten(value)} holds no {what} (a PEM file starting {marker[:27]}...)")
    return TLS(Path(cert).expanduser().resolve(), Path(key).expanduser().resolve())


@dataclass(frozen=True)
class ReplicaPolicy:
    """A SkyServe service: how many replicas, and when to add or remove them."""

    min_replicas: int
    max_replicas: int
    target_qps: float | None = None
    base_ondemand_fallback: int | None = None
    dynamic_ondemand_fallback: bool = False

    @property
    def autoscales(self) -> bool:
        return self.max_replicas > self.min_replicas

    @property
    def text(self) -> str:
        if not self.autoscales:
            return f"{self.min_replicas} replica{'s' if self.min_replicas > 1 else ''}"
        return f"{self.min_replicas}..{self.max_replicas} replicas at {self.target_qps:g} QPS each"


@dataclass(frozen=True, kw_only=True)
class ServeSpec(LaunchSpec):
    """Everything needed to render and launch one serving deployment."""

    model: ModelRef
    port: int = DEFAULT_PORT
    engine: str = "vllm"
    max_model_len: int | None = None
    dtype: str | None = None
    quantization: str | None = None
    engine_args: tuple[str, ...] = ()
    keep_on_failure: bool = False
    auth: bool = False  # an API key guards the endpoint (vLLM on a cluster, unless --no_auth)
    replicas: ReplicaPolicy | None = None  # a SkyServe service instead of one cluster
    chat_template: str | None = None  # Jinja text (vLLM)
    eos_token: str | None = None  # a token that also ends generation (vLLM)
    loras: tuple[ModelRef, ...] = ()  # LoRA adapters served on the model, each under its ``name``
    num_nodes: int = 1  # > 1: one vLLM across nodes (Ray; pipeline parallel across them)
    cache_weights: str | None = None  # bucket folder that caches a Hub model's weights for later replicas
    timeout: float | None = None  # seconds to wait for readiness (default: the backend's)
    open_port: bool = False  # open the port even without an API key (by default such an endpoint stays private)
    tls: TLS | None = None  # vLLM's own HTTPS (SkyServe's load balancer for a service)
    weights: str = "auto"  # how bucket weights reach vLLM: auto, stream or copy (llm_atc.weights)
    max_loras: int = 0  # runtime LoRA: adapters vLLM keeps active at once (0: no runtime loading)
    max_lora_rank: int = 0  # runtime LoRA: the highest adapter rank it accepts
    extra_models: tuple[ModelRef, ...] = ()  # serve --name A --name B: one vLLM each, behind vLLM's router
    task: str = model_tasks.AUTO  # --task: what the model is served for (auto: what it carries says)
    tool_parser: str = model_tasks.AUTO  # --tool_parser: auto (the model family's), none or a vLLM parser name
    reasoning_parser: str = model_tasks.AUTO  # --reasoning_parser: likewise
    runtime_lora_asked: bool = False  # --max_loras or --max_lora_rank was given (not just the default)
    aliases: tuple[str, ...] = ()  # --alias: more names clients may send as `model` for the (one) model
    servings: tuple[Serving, ...] = ()  # how each of ``models`` is served, once read from the models (app.serving)

    def serving_of(self, model: ModelRef) -> Serving:
        """How ``model`` is served (generative, with no parser, until app.serving has read the models)."""
        for candidate, serving in zip(self.models, self.servings, strict=False):
            if candidate == model:
                return serving
        return Serving()

    @property
    def models(self) -> tuple[ModelRef, ...]:
        """Every model the deployment serves (``model`` first)."""
        return (self.model, *self.extra_models)

    @property
    def private(self) -> bool:
        """No API key and no --open_port on a cluster: the port stays closed (reach it with --forward)."""
        return not self.is_local and not self.auth and not self.open_port

    @property
    def served_name(self) -> str:
        """The ``model`` clients send for :attr:`model`."""
        return self.served_name_of(self.model)

    @property
    def served_names(self) -> tuple[str, ...]:
        return tuple(self.served_name_of(m) for m in self.models)

    @property
    def served_text(self) -> str:
        """The served names, for messages."""
        return ", ".join(self.served_names)

    def served_name_of(self, model: ModelRef) -> str:
        """The ``model`` clients send: ``--name``, except that a folder named by an absolute,
        ``~`` or ``..`` path is served on a cluster under its folder name (the path means
        nothing on the node)."""
        from pathlib import PurePosixPath

        name = model.name
        if model.path is None or self.is_local:
            return name
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "~")) or ".." in parts:
            return model.path.name
        return name


LORA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


def parse_loras(values) -> tuple[tuple[str, str], ...]:
    """``--lora NAME=REF`` as (NAME, REF) pairs; REF (llm-atc/<run>, an s3:// or gs:// URI, a folder or a Hub id)
    is looked up later (``app.resolve``) and checked with :func:`check_loras`."""
    pairs: list[tuple[str, str]] = []
    for value in values:
        name, sep, ref = value.partition("=")
        name, ref = name.strip(), ref.strip()
        if not sep or not name or not ref:
            raise UserError(f"--lora {shorten(value)}: give NAME=REF, e.g. support=llm-atc/my-run")
        if not LORA_NAME_RE.fullmatch(name):
            raise UserError(
                f"--lora {shorten(value)}: {shorten(name)} is not a valid adapter name (letters, digits, . _ / -)"
            )
        if any(taken == name for taken, _ in pairs):
            raise UserError(f"--lora {name} is given twice")
        pairs.append((name, ref))
    return tuple(pairs)


def check_loras(adapters: tuple[ModelRef, ...]) -> tuple[ModelRef, ...]:
    """The resolved ``--lora`` adapters (each under its NAME): a folder must hold an adapter."""
    for adapter in adapters:
        if adapter.path is not None and not (adapter.path / "adapter_config.json").is_file():
            raise UserError(f"--lora {adapter.name}: {adapter.path} holds no adapter_config.json (not a LoRA adapter)")
    return adapters


def _check_eos_token(value: str | None) -> str | None:
    if value is not None and (not value.strip() or any(c.isspace() for c in value)):
        raise UserError(f"--eos_token {value!r}: give one token as the tokenizer spells it, e.g. <|im_end|>")
    return value


CHAT_TEMPLATE_MAX_BYTES = 256 * 1024


def read_chat_template(value: str | None) -> str | None:
    """``--chat_template``: a file's text, or the Jinja template itself; it must parse and use ``messages``."""
    if value is None:
        return None
    inline = "{{" in value or "{%" in value
    text = value if inline else read_text_file(value, option="--chat_template", max_bytes=CHAT_TEMPLATE_MAX_BYTES)
    shown = "the template given" if inline else shorten(value)
    if not text.strip():
        raise UserError(f"--chat_template {shown} is empty")
    if inline and len(text.encode()) > CHAT_TEMPLATE_MAX_BYTES:
        raise UserError(f"--chat_template: the template given is over {CHAT_TEMPLATE_MAX_BYTES // 1024} KiB")
    check_chat_template(text, shown)
    return text


def check_chat_template(text: str, shown: str) -> None:
    """The template parses as Jinja (with transformers' ``{% generation %}`` tag) and reads ``messages``."""
    import jinja2
    from jinja2 import meta
    from jinja2.ext import Extension

    class Generation(Extension):  # transformers marks assistant text with {% generation %}...{% endgeneration %}
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    env = jinja2.Environment(extensions=[Generation, "jinja2.ext.loopcontrols"])
    try:
        names = meta.find_undeclared_variables(env.parse(text))
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"--chat_template {shown}: not a Jinja template (line {exc.lineno}: {exc.message})") from None
    if "messages" not in names:
        raise UserError(f"--chat_template {shown} never uses `messages`, so it cannot render a chat")


REPLICAS_RE = re.compile(r"^(\d+)(?:\.\.(\d+))?$")


def parse_replicas(
    replicas: str | int | None,
    *,
    target_qps: float | None = None,
    ondemand_fallback: int | None = None,
    dynamic_ondemand_fallback: bool = False,
    use_spot: bool = False,
) -> ReplicaPolicy | None:
    """``--replicas N`` or ``MIN..MAX`` (MIN may be 0) with the autoscaling and spot options."""
    if replicas is None:
        extra = [
            flag
            for flag, given in (
                ("--target_qps", target_qps is not None),
                ("--ondemand_fallback", ondemand_fallback is not None),
                ("--dynamic_ondemand_fallback", dynamic_ondemand_fallback),
            )
            if given
        ]
        if extra:
            raise UserError(f"{extra[0]} goes with --replicas (a SkyServe service)")
        return None
    match = REPLICAS_RE.fullmatch(str(replicas).strip())
    if not match:
        raise UserError(f"--replicas {shorten(str(replicas))}: give N or MIN..MAX, e.g. 2 or 0..4")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if high < low:
        raise UserError(f"--replicas {replicas}: MIN must not exceed MAX")
    if high < 1:
        raise UserError(f"--replicas {replicas}: at least one replica must be allowed")
    if high > low and target_qps is None:
        raise UserError(f"--replicas {replicas} autoscales: give --target_qps (requests per second per replica)")
    if target_qps is not None and high == low:
        raise UserError(f"--target_qps needs a range to scale in, e.g. --replicas {max(low - 1, 0)}..{low + 2}")
    if target_qps is not None:
        import math

        if not math.isfinite(target_qps) or target_qps <= 0 or target_qps > 1_000_000:
            raise UserError(
                f"--target_qps {target_qps:g}: must be a positive number of requests per second (at most 1000000)"
            )
    check_number(high, "--replicas")
    if (ondemand_fallback is not None or dynamic_ondemand_fallback) and not use_spot:
        raise UserError("--ondemand_fallback and --dynamic_ondemand_fallback go with --use_spot")
    if ondemand_fallback is not None and not 0 <= ondemand_fallback <= high:
        raise UserError(f"--ondemand_fallback {ondemand_fallback}: between 0 and the most replicas ({high})")
    return ReplicaPolicy(low, high, target_qps, ondemand_fallback, dynamic_ondemand_fallback)


def parse_placement(
    *,
    cloud: str | None,
    region: str | None,
    zone: str | None,
    accelerator: str | None,
    use_spot: bool = False,
    disk_size: int | None = None,
    cpus: str | None = None,
    memory: str | None = None,
) -> Placement:
    """Validate cloud/region/zone and the resources request."""
    if zone and not region:
        raise UserError("--zone needs --region (and --cloud)")
    if region and not cloud:
        raise UserError("--region needs --cloud to say which cloud the region is in")
    if cloud:
        cloud = cloud.strip().lower()
        if cloud != LOCAL:
            cloud = canonical_infra(cloud)
    check_number(disk_size, "--disk_size")
    return Placement(
        cloud,
        region,
        zone,
        accelerators_of(accelerator, cloud),
        use_spot,
        disk_size,
        cpus=check_resource_amount(cpus, option="--cpus", unit="vCPUs"),
        memory=check_resource_amount(memory, option="--memory", unit="GB"),
    )


def accelerators_of(accelerator: str | None, cloud: str | None) -> tuple[Accelerator, ...]:
    """``--accelerator`` on ``cloud`` (a canonical name): GPU names are checked against SkyPilot's list, except on
    infra whose GPUs are the user's own (Kubernetes, Slurm, SSH node pools)."""
    if not accelerator or accelerator.strip().lower() == NONE:
        return ()
    return parse_accelerators(accelerator, None if cloud in gpus.CUSTOM_GPU_INFRA else gpus.known_gpus())


AUTO = "auto"
NONE = "none"  # --accelerator none: CPUs only


def _placement_and_envs(
    *,
    cloud,
    region,
    zone,
    accelerator,
    use_spot,
    disk_size,
    cpus,
    memory,
    envs,
    secrets,
    needs_accelerator: str | None,
) -> tuple[Placement, dict[str, str], dict[str, str]]:
    """The placement and the envs split from secrets.

    ``needs_accelerator``: an example accelerator when one is required off ``local``
    (None when CPUs alone are fine).
    """
    is_local = (cloud or "").strip().lower() == LOCAL
    if is_local and (cpus or memory):
        raise UserError("--cpus and --memory do not apply to --cloud local")
    placement = parse_placement(
        cloud=cloud,
        region=region,
        zone=zone,
        accelerator=None if is_local else accelerator,
        use_spot=use_spot,
        disk_size=disk_size,
        cpus=cpus,
        memory=memory,
    )
    if not is_local and needs_accelerator and not placement.accelerators:
        raise UserError(f"--accelerator is required on a cloud, e.g. {needs_accelerator}")
    plain, secret_values = split_envs_and_secrets(
        parse_env_pairs(envs, option="--envs"), parse_env_pairs(secrets, option="--secret")
    )
    return placement, plain, secret_values


def check_serve_options(
    name: str | tuple | list | None,
    *,
    source: str | None = None,
    accelerator: str | None = None,
    cluster: str | None = None,
    cloud: str | None = None,
    region: str | None = None,
    zone: str | None = None,
    envs: tuple[str, ...] | list[str] = (),
    secrets: tuple[str, ...] | list[str] = (),
    use_spot: bool = False,
    disk_size: int | None = None,
    cpus: str | None = None,
    memory: str | None = None,
    max_model_len: int | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    vllm_args: str | None = None,
    port: int = DEFAULT_PORT,
    engine: str = "auto",
    detach_setup: bool = False,
    detach_run: bool = False,
    no_setup: bool = False,
    keep_on_failure: bool = False,
    no_auth: bool = False,
    replicas: str | int | None = None,
    target_qps: float | None = None,
    ondemand_fallback: int | None = None,
    dynamic_ondemand_fallback: bool = False,
    chat_template: str | None = None,
    eos_token: str | None = None,
    lora: tuple[str, ...] | list[str] = (),
    num_nodes: int = 1,
    cache_weights: str | None = None,
    timeout: float | None = None,
    open_port: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    weights: str = "auto",
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
    task: str | None = None,
    tool_parser: str | None = None,
    reasoning_parser: str | None = None,
    alias: tuple[str, ...] | list[str] = (),
    idle_minutes: float | None = None,
    max_hours: float | None = None,
    price_per_hour: float | None = None,
) -> ServeRequest:
    """``serve``'s raw option values, checked as far as they can be without the models: a typo in any of them is
    reported before a run is looked up, the demo model built or SkyPilot's catalog read. Raises UserError.

    Off ``local``, ``engine="auto"`` means vLLM, which gets ``A100:1`` unless ``accelerator`` says otherwise;
    ``transformers`` asks for no GPU unless given one.
    """
    given = [name] if isinstance(name, str) or name is None else list(name)  # --name may be repeated
    names: list[str] = [n for n in given if n is not None]
    if engine not in ENGINES:
        raise UserError(f"--engine {shorten(engine)}: choose one of {', '.join(ENGINES)}")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {shorten(dtype)}: choose one of {', '.join(DTYPES)}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise UserError(f"--quantization {shorten(quantization)}: choose one of {', '.join(QUANTIZATIONS)}")
    check_number(max_model_len, "--max_model_len")
    check_number(timeout, "--timeout")
    check_number(num_nodes, "--num_nodes")
    check_port(port)
    limits = check_limits(idle_minutes, max_hours, price_per_hour)
    task = model_tasks.check_task(task)
    tool_parser = model_tasks.check_parser(tool_parser, "tool")
    reasoning_parser = model_tasks.check_parser(reasoning_parser, "reasoning")
    _check_task_options(
        task,
        engine,
        {
            "--tool_parser": tool_parser not in (model_tasks.AUTO, model_tasks.NONE),
            "--reasoning_parser": reasoning_parser not in (model_tasks.AUTO, model_tasks.NONE),
            "--lora": bool(lora),
            "--max_loras": bool(max_loras),
            "--max_lora_rank": max_lora_rank is not None,
            "--chat_template": chat_template is not None,
            "--eos_token": eos_token is not None,
        },
    )
    is_local = (cloud or "").strip().lower() == LOCAL
    if port == 0 and not is_local:
        raise UserError("--port 0 (pick a free port) only works with --cloud local")
    if is_local and (region or zone):
        raise UserError("--region and --zone do not apply to --cloud local")
    if not names and not is_local:
        raise UserError(
            "--name is required: a Hugging Face id, llm-atc/<run> or a model folder (only --cloud "
            "local has a built-in demo model)"
        )
    engine_args = check_vllm_args(parse_extra_args(vllm_args, option="--vllm_args"), several=len(names) > 1)
    policy = parse_replicas(
        replicas,
        target_qps=target_qps,
        ondemand_fallback=ondemand_fallback,
        dynamic_ondemand_fallback=dynamic_ondemand_fallback,
        use_spot=use_spot,
    )
    if policy is not None and is_local:
        raise UserError("--replicas runs a SkyServe service on clusters; it does not apply to --cloud local")
    if keep_on_failure and is_local:
        raise UserError("--keep_on_failure applies to clusters; locally a failed engine has already exited")
    template = read_chat_template(chat_template)
    if len(names) > 1:
        check_several(
            names,
            engine=engine,
            given={
                "--source": source,
                "--lora": lora,
                "--chat_template": chat_template,
                "--eos_token": eos_token,
                "--cache_weights": cache_weights,
                "--num_nodes": num_nodes > 1,
                "--replicas": replicas,
                "--max_loras": max_loras,
                "--max_lora_rank": max_lora_rank,
                "--alias": alias,
                "--task": task != model_tasks.AUTO,
                "--tool_parser": tool_parser != model_tasks.AUTO,
                "--reasoning_parser": reasoning_parser != model_tasks.AUTO,
            },
        )
        max_loras = 0  # runtime LoRA needs one engine to load into
    if engine == "auto" and not is_local:
        engine = "vllm"
    if engine == "vllm" and not is_local and not accelerator:
        # --cpus alone asks for CPUs, as with train; vLLM then runs its CPU build on the node.
        accelerator = NONE if cpus else DEFAULT_ACCELERATOR
    auto = not is_local and (accelerator or "").strip().lower() == AUTO
    placement, plain, secret_values = _placement_and_envs(
        cloud=cloud,
        region=region,
        zone=zone,
        accelerator=None if auto else accelerator,
        use_spot=use_spot,
        disk_size=disk_size,
        cpus=cpus,
        memory=memory,
        envs=envs,
        secrets=secrets,
        needs_accelerator=None,
    )
    _check_serve_limits(limits, policy=policy, engine=engine, keep_on_failure=keep_on_failure)
    if cache_weights is not None:
        from llm_atc.bucket_uri import BucketURI

        cache_weights = str(BucketURI.parse(cache_weights, option="--cache_weights"))
        if is_local or engine != "vllm":
            raise UserError(CACHE_WEIGHTS_APPLIES)

    check_choice(weights, engine=engine, cache_weights=cache_weights)
    runtime_lora_asked = max_loras is not None or max_lora_rank is not None
    if task not in (model_tasks.AUTO, model_tasks.GENERATE):
        max_loras = 0  # a pooling model has no runtime LoRA
    max_loras, max_lora_rank = _runtime_lora(max_loras, max_lora_rank, engine=engine, num_nodes=num_nodes)
    if num_nodes > 1 and (is_local or engine != "vllm" or policy is not None):
        raise UserError(
            "--num_nodes > 1 spans one vLLM over several nodes of a cluster: not with --cloud local, "
            "--engine transformers or --replicas"
        )
    return ServeRequest(
        names=tuple(names),
        source=source,
        loras=parse_loras(lora),
        auto=auto,
        cluster=check_cluster_name(cluster) if cluster else None,
        fields=dict(
            placement=placement,
            envs=plain,
            secrets=secret_values,
            port=port,
            engine=engine,
            max_model_len=max_model_len,
            dtype=dtype,
            quantization=quantization,
            engine_args=engine_args,
            keep_on_failure=keep_on_failure,
            # `transformers serve` has no API keys. Locally the engine binds 127.0.0.1 and uses a key when given one.
            auth=not no_auth and (API_KEY_SECRET in secret_values if is_local else engine == "vllm"),
            replicas=policy,
            chat_template=template,
            eos_token=_check_eos_token(eos_token),
            num_nodes=num_nodes,
            cache_weights=cache_weights,
            timeout=timeout,
            open_port=open_port,
            tls=read_tls(tls_cert, tls_key, engine=engine),
            weights=weights,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            task=task,
            tool_parser=tool_parser,
            reasoning_parser=reasoning_parser,
            runtime_lora_asked=runtime_lora_asked,
            aliases=_check_aliases(alias, engine),
            limits=limits,
            price_per_hour=price_per_hour,
            detach_setup=detach_setup,
            detach_run=detach_run,
            no_setup=no_setup,
        ),
    )


CACHE_WEIGHTS_APPLIES = (
    "--cache_weights stages a Hugging Face model for vLLM on clusters; llm-atc/<run> and "
    "folders already load from their own place"
)


@dataclass(frozen=True)
class ServeRequest:
    """``serve``'s options after :func:`check_serve_options`: what is still to be looked up (the models, the
    ``--lora`` adapters, ``--accelerator auto``) and the spec's other fields, already checked."""

    names: tuple[str, ...]  # --name, in order; none: the built-in demo model (--cloud local)
    source: str | None
    loras: tuple[tuple[str, str], ...]  # --lora NAME=REF, REF not yet looked up
    auto: bool  # --accelerator auto, on a cloud: sized against SkyPilot's catalog
    cluster: str | None  # -c/--cluster, checked (None: named after the models)
    fields: dict = field(default_factory=dict)  # the rest of ServeSpec's fields

    @property
    def sizing(self) -> dict:
        """What ``--accelerator auto`` sizes the models with (``planning.auto_accelerators``' options)."""
        placement: Placement = self.fields["placement"]
        task = self.fields["task"]
        return {
            "mode": "serve",
            "max_model_len": self.fields["max_model_len"],
            "dtype": self.fields["dtype"],
            "quantization": self.fields["quantization"],
            "cloud": placement.cloud,
            "region": placement.region,
            "use_spot": placement.use_spot,
            **({"task": task} if task != model_tasks.AUTO and len(self.names) < 2 else {}),
        }


def complete_serve_spec(
    request: ServeRequest,
    models: tuple[ModelRef, ...],
    loras: tuple[ModelRef, ...] = (),
    *,
    auto_accelerator: str | None = None,
    auto_max_model_len: int | None = None,
) -> ServeSpec:
    """The :class:`ServeSpec` of a checked request, once its models and adapters are resolved (and
    ``--accelerator auto`` sized): the checks that need them, then the spec."""
    model, *extra_models = models
    fields = dict(request.fields)
    if len(models) > 1:
        check_no_adapters(models)
    if fields["cache_weights"] is not None and model.hub_id is None:
        raise UserError(CACHE_WEIGHTS_APPLIES)

    check_source(fields["weights"], model=model, cache_weights=fields["cache_weights"])
    if auto_accelerator is not None:
        placement: Placement = fields["placement"]
        fields["placement"] = replace(placement, accelerators=accelerators_of(auto_accelerator, placement.cloud))
        fields["max_model_len"] = fields["max_model_len"] or auto_max_model_len
    cluster = request.cluster or cluster_name_for("-".join(m.name.rstrip("/").split("/")[-1] for m in models))
    return _check_served_names(
        ServeSpec(model=model, extra_models=tuple(extra_models), loras=check_loras(loras), cluster=cluster, **fields)
    )


def _check_task_options(task: str, engine: str, given: dict[str, bool]) -> None:
    """``--task`` and the parsers: what transformers serve can do, and what a pooling model takes."""
    if engine == "transformers":
        asked = [flag for flag in ("--tool_parser", "--reasoning_parser") if given[flag]]
        if task not in (model_tasks.AUTO, model_tasks.GENERATE):
            asked.insert(0, f"--task {task}")
        if asked:
            raise UserError(
                f"{asked[0]} needs vLLM (transformers serve only generates text); drop --engine transformers"
            )
    if task in (model_tasks.AUTO, model_tasks.GENERATE):
        return
    for flag, value in given.items():
        if value:
            raise UserError(
                f"{flag} applies to generative models; --task {task} serves {model_tasks.ENDPOINT_TEXT[task]}"
            )


def check_limits(idle_minutes: float | None, max_hours: float | None, price: float | None) -> Limits:
    """``--idle_minutes``, ``--max_hours`` and ``--price_per_hour``, each a finite number in its range."""
    for value, option in ((idle_minutes, "--idle_minutes"), (max_hours, "--max_hours"), (price, "--price_per_hour")):
        check_number(value, option)
    return Limits(idle_minutes or None, max_hours or None)


def _check_serve_limits(limits: Limits, *, policy: ReplicaPolicy | None, engine: str, keep_on_failure: bool) -> None:
    """Where a deployment's limits can apply: idleness is counted from vLLM's metrics, a service scales to zero
    instead of ending, and a cluster that ends by itself is not kept."""
    if limits.idle_minutes and engine == "transformers":
        raise UserError("--idle_minutes counts requests from vLLM's metrics; transformers serve has none")
    if policy is not None:
        if limits.max_hours:
            raise UserError("--max_hours ends one cluster; a SkyServe service (--replicas) runs until `llm-atc down`")
        if limits.idle_minutes and policy.min_replicas > 0:
            raise UserError(
                f"--idle_minutes on a service scales it to zero: give --replicas 0..{policy.max_replicas} "
                "--target_qps Q (it keeps its endpoint; a request brings a replica back)"
            )
    if keep_on_failure and (limits.idle_minutes or limits.max_hours):
        raise UserError("--keep_on_failure keeps a cluster whose engine ended; --idle_minutes and --max_hours end it")


# Most models one deployment serves side by side (one vLLM each on the node, behind vLLM's router).
MAX_MODELS = 8


def check_several(names: list[str], *, engine: str, given: dict) -> None:
    """``--name A --name B ...``: each model served by a vLLM of its own behind vLLM's router; the options that
    belong to one model are refused."""
    if engine == "transformers":
        raise UserError(
            "several --name need vLLM (one engine per model behind vLLM's router); drop --engine transformers"
        )
    if len(names) > MAX_MODELS:
        raise UserError(f"--name is given {len(names)} times; one deployment serves at most {MAX_MODELS} models")
    for option, value in given.items():
        if value:
            raise UserError(
                f"{option} applies to a deployment of one model; with several --name, serve that model on its own"
            )
    for index, name in enumerate(names):
        if name.strip() in (n.strip() for n in names[:index]):
            raise UserError(f"--name {shorten(name)} is given twice; each model is served once")


def check_no_adapters(models: tuple[ModelRef, ...]) -> None:
    """Several ``--name``: each a whole model (an adapter is served on its base with ``--lora``)."""
    for model in models:
        if model.path is not None and not (model.path / "config.json").is_file():
            raise UserError(
                f"--name {shorten(model.name)} is a LoRA adapter: serve it on its base with --lora, or on its own"
            )


def _check_served_names(spec: ServeSpec) -> ServeSpec:
    """Clients tell the models apart by name: two models may not be served under one, nor an alias be a
    name already taken (by the model or a --lora adapter)."""
    names = spec.served_names
    for index, name in enumerate(names):
        if name in names[:index]:
            raise UserError(
                f"--name: two models would both be served as {shorten(name)} (folders of the same name); "
                "rename one of the folders"
            )
    taken = {*names, *(adapter.name for adapter in spec.loras)}
    for alias in spec.aliases:
        if alias in taken:
            raise UserError(f"--alias {shorten(alias)}: the deployment already answers to that name")
    return spec


def _check_aliases(values, engine: str) -> tuple[str, ...]:
    """``--alias NAME`` (repeatable): names of the model's own, valid as vLLM model names, each once."""
    aliases: list[str] = []
    for value in values:
        name = value.strip()
        if not LORA_NAME_RE.fullmatch(name):
            raise UserError(f"--alias {shorten(value)}: not a valid model name (letters, digits, . _ / -)")
        if name in aliases:
            raise UserError(f"--alias {name} is given twice")
        aliases.append(name)
    if aliases and engine == "transformers":
        raise UserError("--alias needs vLLM (transformers serve answers to one name); drop --engine transformers")
    return tuple(aliases)


CHECKPOINT_STORES = ("S3", "GCS", "local")
DEFAULT_BASE_MODEL = "meta-llama/Llama-2-7b-hf"  # the original llm-atc's, on a cloud
DEFAULT_LOCAL_BASE_MODEL = "llm-atc-demo"  # on this machine: the built-in tiny model (no network, seconds)


@dataclass(frozen=True, kw_only=True)
class TrainSpec(LaunchSpec):
    """Everything needed to render and launch one fine-tuning run."""

    run: str
    model_type: str
    data: str
    output_uri: str
    base_model: str = DEFAULT_BASE_MODEL
    description: str = ""
    num_nodes: int = 1
    resume: bool = False  # continue the failed or stopped run of this name from its last checkpoint
    default_bucket: bool = False  # no --checkpoint_bucket: the user's default bucket (created on first use)
    base_bucket: str | None = None  # --base_model llm-atc/<run> published in a bucket: copied to the node
    serve_on: str | None = None  # a running deployment that loads the adapter when the run succeeds

    @property
    def data_is_local(self) -> bool:
        return "://" not in self.data


def check_train_options(
    *,
    model_type: str,
    finetune_data: str,
    checkpoint_bucket: str | None,
    checkpoint_store: str | None,
    name: str | None = None,
    description: str | None = None,
    base_model: str | None = None,
    accelerator: str | None = None,
    cluster: str | None = None,
    cloud: str | None = None,
    region: str | None = None,
    zone: str | None = None,
    num_nodes: int = 1,
    use_spot: bool = False,
    disk_size: int | None = None,
    cpus: str | None = None,
    memory: str | None = None,
    envs: tuple[str, ...] | list[str] = (),
    secrets: tuple[str, ...] | list[str] = (),
    detach_setup: bool = False,
    detach_run: bool = False,
    no_setup: bool = False,
    resume: bool = False,
    serve_on: str | None = None,
    eval_fraction: float | None = None,
    max_hours: float | None = None,
    price_per_hour: float | None = None,
) -> TrainRequest:
    """``train``'s raw option values, checked as far as they can be without the registry, the base model or
    SkyPilot's catalog (so ``--dryrun`` needs no credentials); raises UserError."""
    import time

    if model_type not in MODEL_TYPES:
        raise UserError(f"--model_type {shorten(model_type)}: choose one of {', '.join(MODEL_TYPES)}")
    is_local = (cloud or "").strip().lower() == LOCAL
    check_number(num_nodes, "--num_nodes")
    if is_local and (num_nodes > 1 or use_spot):
        raise UserError("--num_nodes and --use_spot do not apply to --cloud local")
    check_number(eval_fraction, "--eval_fraction")
    train_envs = parse_env_pairs(envs, option="--envs")
    _check_train_settings(model_type, train_envs)
    limits = check_limits(None, max_hours, price_per_hour)
    run = check_run_name(name) if name else f"{model_type}-{time.strftime('%Y%m%d-%H%M%S')}"
    store, checkpoint_bucket = _check_store(checkpoint_store, checkpoint_bucket, is_local)
    if "://" in finetune_data:
        BucketURI.parse(finetune_data, option="--finetune_data")
    else:
        _check_data_file(finetune_data)
    default = DEFAULT_LOCAL_BASE_MODEL if is_local else DEFAULT_BASE_MODEL
    base = _model_size_base(base_model, envs) or base_model or default
    auto = not is_local and (accelerator or "").strip().lower() == AUTO
    placement, plain, secret_values = _placement_and_envs(
        cloud=cloud,
        region=region,
        zone=zone,
        accelerator=None if auto else accelerator,
        use_spot=use_spot,
        disk_size=disk_size,
        cpus=cpus,
        memory=memory,
        envs=envs,
        secrets=secrets,
        # CPU-only training is allowed when asked for explicitly with --cpus (and auto picks the GPUs later).
        needs_accelerator=None if cpus or auto else "A100-80GB:8 or L4:1 (or --cpus N to train on CPUs)",
    )
    plain.pop("MODEL_SIZE", None)  # the original llm-atc's way to pick the base: done above
    if eval_fraction is not None:
        plain["EVAL_FRACTION"] = f"{eval_fraction:g}"
    if serve_on is not None:
        _check_serve_on(model_type, detach_run, plain)
        plain["MERGE"] = "0"  # the deployment loads the adapter alone, on the base it already serves
    return TrainRequest(
        store=store,
        checkpoint_bucket=checkpoint_bucket,
        base=base,
        auto=auto,
        sizing={
            "mode": MODEL_TYPES[model_type],
            "cloud": placement.cloud,
            "region": placement.region,
            "use_spot": use_spot,
            "max_nodes": 8 if model_type == "vicuna" else 1,
            "train_envs": train_envs,
        },
        fields=dict(
            run=run,
            model_type=model_type,
            data=finetune_data if "://" in finetune_data else str(Path(finetune_data).resolve()),
            cluster=check_cluster_name(cluster) if cluster else cluster_name_for(run, prefix="llm-atc-train"),
            placement=placement,
            description=description or "",
            num_nodes=num_nodes,
            envs=plain,
            secrets=secret_values,
            detach_setup=detach_setup,
            detach_run=detach_run,
            no_setup=no_setup,
            resume=resume,
            serve_on=serve_on,
            limits=limits,
            price_per_hour=price_per_hour,
        ),
    )


@dataclass(frozen=True)
class TrainRequest:
    """``train``'s options after :func:`check_train_options`: what is still to be looked up (the default bucket,
    a base model that is a run or a folder, ``--accelerator auto``) and the spec's other fields, checked."""

    store: str | None  # S3, GCS or local; None: the cloud's store and the user's default bucket
    checkpoint_bucket: str | None
    base: str  # --base_model (or the MODEL_SIZE / default base), not yet looked up
    auto: bool  # --accelerator auto, on a cloud
    sizing: dict  # what --accelerator auto sizes the base with (planning.auto_accelerators' options)
    fields: dict = field(default_factory=dict)  # the rest of TrainSpec's fields

    @property
    def base_needs_lookup(self) -> bool:
        """The base is a run, a folder or the demo model (a Hub id goes to the node as it is)."""

        base = self.base
        return (
            base == DEFAULT_LOCAL_BASE_MODEL
            or base.startswith("llm-atc/")
            or looks_like_path(base)
            or not HUB_ID_RE.fullmatch(base)
            or Path(base).is_dir()
        )


def complete_train_spec(
    request: TrainRequest,
    *,
    base: str,
    base_bucket: str | None = None,
    store: str | None = None,
    bucket: str | None = None,
    auto_accelerator: str | None = None,
    auto_num_nodes: int = 1,
) -> TrainSpec:
    """The :class:`TrainSpec` of a checked request, once its base is looked up (what the node loads, or the
    bucket holding it), the default bucket named (``store``/``bucket``) and ``--accelerator auto`` sized."""

    fields = dict(request.fields)
    default_bucket = request.store is None
    store = request.store or store
    bucket = request.checkpoint_bucket or bucket
    run = fields["run"]
    if store == "local":
        output_uri = str(home() / "checkpoints" / run)
    elif store and bucket:
        output_uri = str(BucketURI.for_run(store, bucket, run))
    else:
        raise ValueError("complete_train_spec: the default bucket was not looked up (app.resolve.default_bucket)")
    if auto_accelerator is not None:
        placement: Placement = fields["placement"]
        fields["placement"] = replace(placement, accelerators=accelerators_of(auto_accelerator, placement.cloud))
        fields["num_nodes"] = max(fields["num_nodes"], auto_num_nodes)
    return TrainSpec(
        output_uri=output_uri,
        base_model=base,
        default_bucket=default_bucket,
        base_bucket=base_bucket,
        **fields,
    )


def _check_data_file(value: str) -> None:
    """``--finetune_data`` on this machine: a regular file."""
    path = Path(value).expanduser()
    shown = shorten(value)
    if path.is_dir():
        raise UserError(f"--finetune_data {shown} is a folder: give the data file (ShareGPT JSON or OpenAI JSONL)")
    if path.exists() and not path.is_file():
        raise UserError(f"--finetune_data {shown} is not a regular file (a pipe or a device): save the data to a file")
    if not path.exists():
        raise NotFoundError(f"--finetune_data {shown}: no such file")


def _check_train_settings(model_type: str, envs: dict[str, str]) -> None:
    """The training settings in ``--envs`` (EPOCHS, LR, ...), read as the training script on the node reads
    them: a value it would refuse there is refused here, before anything is paid for."""
    from llm_atc.recipes.train import finetune

    try:
        finetune.read_config({**envs, "MODEL_TYPE": model_type, "DATA": "checked-apart"})
    except finetune.SettingError as exc:
        raise UserError(f"--envs {exc}") from None


def _check_serve_on(model_type: str, detach_run: bool, envs: dict[str, str]) -> None:
    """``--serve_on``: a LoRA adapter, waited for."""
    if model_type == "vicuna":
        raise UserError("--serve_on loads a LoRA adapter: use --model_type lora or qlora (vicuna trains every weight)")
    if detach_run:
        raise UserError(
            "--serve_on loads the adapter once the run succeeds, so it waits for the run: drop --detach_run "
            "(or later: llm-atc adapters add DEPLOYMENT llm-atc/<run>=llm-atc/<run>)"
        )
    if envs.get("MERGE", "0").lower() not in ("0", "false", "no", "off"):
        raise UserError("--serve_on keeps the adapter unmerged (MERGE=0); drop --envs MERGE=1")


# The original llm-atc picked the base with --envs MODEL_SIZE=7|13; these are the sizes Llama 2 has.
MODEL_SIZES = {"7": "meta-llama/Llama-2-7b-hf", "13": "meta-llama/Llama-2-13b-hf", "70": "meta-llama/Llama-2-70b-hf"}


def _model_size_base(base_model: str | None, envs) -> str | None:
    """``--envs MODEL_SIZE=N``: the Llama 2 base of that size, as the original llm-atc chose it."""
    size = parse_env_pairs(envs, option="--envs").get("MODEL_SIZE")
    if size is None:
        return None
    if base_model:
        raise UserError(f"--envs MODEL_SIZE={size[:20]} and --base_model both pick the base model; keep one")
    if size.strip() not in MODEL_SIZES:
        raise UserError(
            f"--envs MODEL_SIZE={size[:20]}: Llama 2 comes in {', '.join(MODEL_SIZES)}; pick any "
            "other base with --base_model (e.g. --base_model huggyllama/llama-30b)"
        )
    return MODEL_SIZES[size.strip()]


# Runtime LoRA (`llm-atc adapters add`), on by default with vLLM: a deployment accepts this many
# adapters active at once, up to this rank (vLLM sizes its LoRA buffers from both).
DEFAULT_MAX_LORAS = 4
DEFAULT_MAX_LORA_RANK = 64
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM accepts for --max-lora-rank


def _runtime_lora(max_loras: int | None, max_rank: int | None, *, engine: str, num_nodes: int) -> tuple[int, int]:
    """(max_loras, max_lora_rank): the defaults with vLLM on one node, (0, 0) when off."""
    if max_loras is not None:
        check_number(max_loras, "--max_loras")
    if max_rank is not None and max_rank not in VLLM_LORA_RANKS:
        raise UserError(f"--max_lora_rank {max_rank}: vLLM accepts {', '.join(map(str, VLLM_LORA_RANKS))}")
    if engine == "transformers" or num_nodes > 1:
        if max_loras or max_rank:
            raise UserError(
                "--max_loras/--max_lora_rank: runtime LoRA needs vLLM on one node "
                "(not --engine transformers or --num_nodes > 1)"
            )
        return 0, 0
    loras = DEFAULT_MAX_LORAS if max_loras is None else max_loras
    if loras == 0:
        if max_rank:
            raise UserError("--max_lora_rank applies to runtime LoRA, which --max_loras 0 turns off")
        return 0, 0
    return loras, max_rank or DEFAULT_MAX_LORA_RANK


def _check_store(store: str | None, bucket: str | None, is_local: bool) -> tuple[str | None, str | None]:
    """(store, bucket). Without either option, a run on a cloud goes to the cloud's store (GCS on gcp, else S3)
    and a bucket of the user's own, as the original llm-atc did (store None: ``app.resolve.default_bucket``
    names it); a run here stays here."""
    if store is None and bucket is None:
        return ("local" if is_local else None), None
    if store is None:
        raise UserError("--checkpoint_store is required with --checkpoint_bucket: S3 or GCS")
    normalised = {s.lower(): s for s in CHECKPOINT_STORES}.get(store.lower())
    if normalised is None:
        raise UserError(f"--checkpoint_store {shorten(store)}: choose one of {', '.join(CHECKPOINT_STORES)}")
    if normalised == "local":
        if not is_local:
            raise UserError("--checkpoint_store local only works with --cloud local")
        return normalised, None
    if not bucket:
        raise UserError(f"--checkpoint_bucket is required with --checkpoint_store {normalised}")
    return normalised, bucket
