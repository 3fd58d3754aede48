"""Typed specs built from CLI options or Python API arguments, validated up front."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_atc import gpus
from llm_atc.errors import UserError
from llm_atc.models import ModelRef, resolve_model
from llm_atc.options import (
    Accelerator,
    check_cluster_name,
    check_port,
    cluster_name_for,
    parse_accelerators,
    parse_env_pairs,
    parse_extra_args,
    split_envs_and_secrets,
)
from llm_atc.registry import Registry

LOCAL = "local"
ENGINES = ("auto", "vllm", "transformers")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
DEFAULT_ACCELERATOR = "A100:1"
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

    @property
    def infra(self) -> str | None:
        """SkyPilot 0.14's ``infra`` string, e.g. ``gcp/us-central1/us-central1-a``."""
        if not self.cloud:
            return None
        return "/".join(p for p in (self.cloud, self.region, self.zone) if p)

    @property
    def accelerator_text(self) -> str:
        return ",".join(str(a) for a in self.accelerators)


@dataclass(frozen=True)
class ServeSpec:
    """Everything needed to render and launch one serving deployment."""

    model: ModelRef
    cluster: str
    placement: Placement
    envs: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    port: int = DEFAULT_PORT
    engine: str = "vllm"
    max_model_len: int | None = None
    dtype: str | None = None
    quantization: str | None = None
    engine_args: tuple[str, ...] = ()
    detach_setup: bool = False
    detach_run: bool = False
    no_setup: bool = False

    @property
    def is_local(self) -> bool:
        return self.placement.cloud == LOCAL


def parse_placement(
    *,
    cloud: str | None,
    region: str | None,
    zone: str | None,
    accelerator: str | None,
    use_spot: bool = False,
    disk_size: int | None = None,
) -> Placement:
    """Validate cloud/region/zone and the accelerator request."""
    if zone and not region:
        raise UserError("--zone needs --region (and --cloud)")
    if region and not cloud:
        raise UserError("--region needs --cloud to say which cloud the region is in")
    if cloud:
        cloud = cloud.strip().lower()
        if cloud != LOCAL:
            from llm_atc.backends import skypilot

            cloud = skypilot.canonical_infra(cloud)
    if disk_size is not None and disk_size < 1:
        raise UserError(f"--disk_size {disk_size}: must be a positive number of GB")
    known = None if cloud in gpus.CUSTOM_GPU_INFRA else gpus.known_gpus()
    accelerators = parse_accelerators(accelerator, known) if accelerator else ()
    return Placement(cloud, region, zone, accelerators, use_spot, disk_size)


def build_serve_spec(
    name: str,
    *,
    source: str | None = None,
    accelerator: str | None = DEFAULT_ACCELERATOR,
    cluster: str | None = None,
    cloud: str | None = None,
    region: str | None = None,
    zone: str | None = None,
    envs: tuple[str, ...] | list[str] = (),
    secrets: tuple[str, ...] | list[str] = (),
    use_spot: bool = False,
    disk_size: int | None = None,
    max_model_len: int | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    vllm_args: str | None = None,
    port: int = DEFAULT_PORT,
    engine: str = "auto",
    detach_setup: bool = False,
    detach_run: bool = False,
    no_setup: bool = False,
    registry: Registry | None = None,
) -> ServeSpec:
    """Turn raw option values into a validated :class:`ServeSpec`; raises UserError."""
    if engine not in ENGINES:
        raise UserError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if max_model_len is not None and max_model_len < 1:
        raise UserError(f"--max_model_len {max_model_len}: must be a positive number of tokens")
    check_port(port)
    is_local = (cloud or "").strip().lower() == LOCAL
    if port == 0 and not is_local:
        raise UserError("--port 0 (pick a free port) only works with --cloud local")
    if is_local and (region or zone):
        raise UserError("--region and --zone do not apply to --cloud local")
    placement = parse_placement(
        cloud=cloud,
        region=region,
        zone=zone,
        accelerator=None if is_local else accelerator,
        use_spot=use_spot,
        disk_size=disk_size,
    )
    if not is_local and not placement.accelerators:
        raise UserError("--accelerator is required to serve on a cloud, e.g. A100:1")
    plain, secret_values = split_envs_and_secrets(
        parse_env_pairs(envs, option="--envs"), parse_env_pairs(secrets, option="--secret")
    )
    model = resolve_model(name, source, registry)
    if engine == "auto" and not is_local:
        engine = "vllm"
    return ServeSpec(
        model=model,
        cluster=check_cluster_name(cluster) if cluster else cluster_name_for(model.name),
        placement=placement,
        envs=plain,
        secrets=secret_values,
        port=port,
        engine=engine,
        max_model_len=max_model_len,
        dtype=dtype,
        quantization=quantization,
        engine_args=parse_extra_args(vllm_args, option="--vllm_args"),
        detach_setup=detach_setup,
        detach_run=detach_run,
        no_setup=no_setup,
    )
