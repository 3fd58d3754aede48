"""Plans: the GPU types in SkyPilot's catalog that fit an estimate, priced; ``--accelerator auto``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llm_atc.errors import UserError
from llm_atc.planning.catalog import Offer, catalog_clouds, catalog_dir, list_offers
from llm_atc.planning.memory import GIB, MemoryEstimate, estimate_memory, fmt_bytes, fmt_count
from llm_atc.planning.model_info import ModelInfo, load_model_info

if TYPE_CHECKING:
    from llm_atc.models import ModelRef

# Most nodes a plan may span (vLLM pipeline stages, or FSDP nodes for a full fine-tune).
MAX_NODES = 8

# Only full nodes (this many GPUs or more) are stretched over several nodes.
MULTI_NODE_MIN_GPUS = 8


@dataclass(frozen=True)
class Option:
    """An offer that fits: ``count`` GPUs per node on ``nodes`` nodes."""

    offer: Offer
    nodes: int
    need_bytes: int
    usable_bytes: int
    hourly: float  # for all nodes, spot or on-demand as asked
    region: str | None
    mode: str = "serve"

    @property
    def accelerator(self) -> str:
        return self.offer.accelerator

    @property
    def count(self) -> int:
        return self.offer.count

    @property
    def accelerators(self) -> str:
        """SkyPilot's ``NAME:COUNT`` (per node)."""
        return f"{self.offer.accelerator}:{self.offer.count}"

    def to_dict(self) -> dict[str, Any]:
        o = self.offer
        return {
            "accelerators": self.accelerators,
            "accelerator": o.accelerator,
            "count": o.count,
            "nodes": self.nodes,
            **(
                {"tensor_parallel": o.count, "pipeline_parallel": self.nodes}
                if self.mode == "serve"
                else {
                    "gpus": o.count * self.nodes,
                    "sharding": "fsdp"
                    if self.mode == "full" and o.count * self.nodes > 1
                    else ("ddp" if o.count * self.nodes > 1 else None),
                }
            ),
            "cloud": o.cloud,
            "instance_type": o.instance_type,
            "region": self.region,
            "gpu_memory_gib": o.gpu_memory_gib,
            "memory_source": o.memory_source,
            "need_per_gpu_gib": round(self.need_bytes / GIB, 2),
            "usable_per_gpu_gib": round(self.usable_bytes / GIB, 2),
            "hourly": round(self.hourly, 4),
            "price": o.price and round(o.price * self.nodes, 4),
            "price_region": o.price_region,
            "spot_price": o.spot_price and round(o.spot_price * self.nodes, 4),
            "spot_region": o.spot_region,
        }


@dataclass
class Plan:
    model: ModelInfo
    estimate: MemoryEstimate
    clouds: list[str]
    region: str | None
    use_spot: bool
    options: list[Option]  # the cheapest fitting offer per (GPU, cloud), cheapest first (single node first)
    infeasible: dict[str, str] = field(default_factory=dict)  # GPU -> why nothing fits

    @property
    def num_nodes(self) -> int | None:
        return self.options[0].nodes if self.options else None

    @property
    def auto(self) -> list[str]:
        """``--accelerator auto``: one ``NAME:COUNT`` per GPU type, cheapest first, all needing
        :attr:`num_nodes` nodes (SkyPilot's any_of cannot mix node counts)."""
        seen: dict[str, str] = {}
        for option in self.options:
            if option.nodes == self.num_nodes and option.accelerator not in seen:
                seen[option.accelerator] = option.accelerators
        return list(seen.values())

    @property
    def best(self) -> Option | None:
        return self.options[0] if self.options else None

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "model": self.model.name,
            "source": self.model.source,
            "adapter_of": self.model.adapter_of,
            "mode": e.mode,
            "architecture": {
                "model_type": e.arch.model_type,
                "layers": e.arch.num_layers,
                "hidden_size": e.arch.hidden_size,
                "attention_heads": e.arch.num_heads,
                "kv_heads": e.arch.num_kv_heads,
                "head_dim": e.arch.head_dim,
                "experts": e.arch.num_experts,
                "mla": bool(e.arch.mla),
                "sliding_window": e.arch.sliding_window if e.arch.sliding_layers else None,
                "max_position_embeddings": e.arch.max_position_embeddings,
            },
            "terms": e.terms(),
            "notes": list(e.notes),
            "clouds": self.clouds,
            "region": self.region,
            "use_spot": self.use_spot,
            "options": [option.to_dict() for option in self.options],
            "infeasible": [{"accelerator": name, "reason": reason} for name, reason in self.infeasible.items()],
            "auto": self.auto,
            "num_nodes": self.num_nodes,
        }


def resolve_clouds(cloud: str | None, region: str | None) -> list[str]:
    if region and not cloud:
        raise UserError("--region needs --cloud to say which cloud the region is in")
    if cloud:
        from llm_atc.options import canonical_infra

        name = canonical_infra(cloud.strip().lower())
        if name in ("local",):
            raise UserError("--cloud local has no catalog; pass a cloud such as aws or gcp")
        return [name]
    clouds = catalog_clouds()
    if not clouds:
        raise UserError(
            f"no SkyPilot GPU catalog in {catalog_dir()}: run `sky gpus list` once online "
            "(it downloads the catalog), or pass --cloud"
        )
    return clouds


def plan_offers(
    estimate: MemoryEstimate, offers: list[Offer], *, use_spot: bool = False, max_nodes: int = MAX_NODES
) -> tuple[list[Option], dict[str, str]]:
    """The cheapest fitting option per (GPU, cloud), and why the other GPU types do not fit.

    Each offer is tried on one node; past one node only the largest count per node of that GPU
    on that cloud is stretched over more nodes, and only where more nodes lower the memory per
    GPU (serve: pipeline stages; full: FSDP), and only for nodes of 8 GPUs or more.
    """
    largest: dict[tuple[str, str], int] = {}
    for offer in offers:
        key = (offer.cloud, offer.accelerator)
        largest[key] = max(largest.get(key, 0), offer.count)
    best: dict[tuple[str, str], Option] = {}
    reasons: dict[str, tuple[int, str]] = {}  # GPU -> (count tried, reason) for the biggest count tried
    for offer in offers:
        price = offer.hourly(use_spot)
        if price is None:
            continue
        if offer.gpu_memory_gib is None:
            reasons.setdefault(offer.accelerator, (0, "its memory per GPU is unknown to SkyPilot's catalog"))
            continue
        stretch = (
            estimate.multi_node
            and offer.count >= MULTI_NODE_MIN_GPUS
            and offer.count == largest[(offer.cloud, offer.accelerator)]
        )
        for nodes in range(1, (max_nodes if stretch else 1) + 1):
            fit = estimate.fit(offer.gpu_memory_gib, offer.count, nodes)
            if fit.ok:
                option = Option(
                    offer, nodes, fit.need_bytes, fit.usable_bytes, price * nodes, offer.region(use_spot), estimate.mode
                )
                key = (offer.cloud, offer.accelerator)
                if key not in best or _rank(option) < _rank(best[key]):
                    best[key] = option
                break
            tried = offer.count * nodes
            if tried >= reasons.get(offer.accelerator, (-1, ""))[0]:
                where = f"{offer.count} x {round(offer.gpu_memory_gib, 1):g} GiB" + (
                    f" x {nodes} nodes" if nodes > 1 else ""
                )
                reasons[offer.accelerator] = (tried, f"{where}: {fit.reason}")
            if fit.reason and "tensor parallel" in fit.reason:
                break
    options = sorted(best.values(), key=_rank)
    fitted = {option.accelerator for option in options}
    infeasible = {name: why for name, (_, why) in sorted(reasons.items()) if name not in fitted}
    return options, infeasible


def _rank(option: Option) -> tuple:
    return (option.nodes, option.hourly, option.accelerator, option.offer.cloud)


def make_plan(
    model: str | ModelRef | ModelInfo | Mapping,
    *,
    mode: str = "serve",
    max_model_len: int | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    cloud: str | None = None,
    region: str | None = None,
    use_spot: bool = False,
    source: str | None = None,
    max_nodes: int = MAX_NODES,
    train_envs: Mapping[str, str] | None = None,
    task: str | None = None,
) -> Plan:
    """Size ``model`` (served for ``task``: default what it says) and price every GPU type in SkyPilot's
    catalog that fits it."""
    info = load_model_info(model, source=source)
    estimate = estimate_memory(
        info,
        mode=mode,
        max_model_len=max_model_len,
        dtype=dtype,
        quantization=quantization,
        train_envs=train_envs,
        task=task,
    )
    clouds = resolve_clouds(cloud, region)
    offers = list_offers(clouds, region)
    if region and not offers:
        raise UserError(f"SkyPilot's catalog lists no GPUs in region {region!r} of {', '.join(clouds)}")
    options, infeasible = plan_offers(estimate, offers, use_spot=use_spot, max_nodes=max_nodes)
    return Plan(info, estimate, clouds, region, use_spot, options, infeasible)


@dataclass(frozen=True)
class AutoChoice:
    """What ``--accelerator auto`` resolves to."""

    accelerators: tuple[str, ...]  # e.g. ("L4:1", "A10G:1", "A100:1"), cheapest first: render as any_of
    num_nodes: int
    max_model_len: int | None  # serve: the context the plan was sized for (pass it to the engine)
    plan: Plan | None  # None for several models on one node (planning.colocate)

    @property
    def accelerator_text(self) -> str:
        """The comma list ``--accelerator`` already accepts (any of them)."""
        return ",".join(self.accelerators)


def auto_accelerators(
    model: str | ModelRef | ModelInfo | Mapping,
    *,
    mode: str = "serve",
    max_model_len: int | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    cloud: str | None = None,
    region: str | None = None,
    use_spot: bool = False,
    max_nodes: int = 1,
    source: str | None = None,
    train_envs: Mapping[str, str] | None = None,
    task: str | None = None,
) -> AutoChoice:
    """The GPU types that fit, cheapest first, on the fewest nodes; raises a one-line
    :class:`UserError` when none does within ``max_nodes``."""
    plan = make_plan(
        model,
        mode=mode,
        max_model_len=max_model_len,
        dtype=dtype,
        quantization=quantization,
        cloud=cloud,
        region=region,
        use_spot=use_spot,
        source=source,
        max_nodes=max(max_nodes, 1),
        train_envs=train_envs,
        task=task,
    )
    if not plan.options:
        raise UserError(
            f"--accelerator auto: no GPU in SkyPilot's catalog ({', '.join(plan.clouds)}) fits "
            f"{plan.model.name} ({_summary(plan.estimate)}){_hint(plan.estimate)}"
        )
    return AutoChoice(tuple(plan.auto), plan.num_nodes or 1, plan.estimate.max_model_len, plan)


def _summary(e: MemoryEstimate) -> str:
    if e.mode == "serve" and not e.generates:
        return f"{fmt_bytes(e.weight_bytes)} of weights + {fmt_bytes(e.activation_bytes)} of activations ({e.task})"
    if e.mode == "serve":
        return (
            f"{fmt_bytes(e.weight_bytes)} of weights + {fmt_bytes(e.kv_cache_bytes)} of KV cache for "
            f"{e.max_model_len} tokens"
        )
    return f"{e.mode} fine-tune of {fmt_count(e.params)} params"


def _hint(e: MemoryEstimate) -> str:
    if e.mode == "serve" and not e.quantization:
        return "; try --quantization fp8 or an AWQ checkpoint, or a smaller --max_model_len"
    if e.mode in ("full", "lora"):
        return "; try --mode qlora" if e.mode == "lora" else "; try --mode lora or --mode qlora"
    return ""


def iter_terms(e: MemoryEstimate) -> Iterator[tuple[str, str]]:
    """Human-readable lines of the formula, for the table view."""
    a = e.arch
    shape = f"{a.model_type or 'model'}, {a.num_layers} layers, {a.num_heads} heads / {a.num_kv_heads} KV heads"
    if a.is_moe:
        shape += f", {a.num_experts} experts ({a.experts_per_token} per token)"
    if a.mla:
        shape += ", MLA"
    yield "Shape", shape
    source = e.params_source
    if e.params_source != "config":
        source += f"; config says {fmt_count(e.params_from_config)}"
    yield "Parameters", f"{fmt_count(e.params)} ({source})"
    yield "Weights", f"{fmt_bytes(e.weight_bytes)} = {e.weight_formula}"
    overhead = fmt_bytes(e.overhead_bytes_per_gpu)
    if e.mode == "serve" and not e.generates:
        yield "Task", f"{e.task}: a pooling model, no KV cache"
        yield (
            "Activations",
            f"{fmt_bytes(e.activation_bytes)} for one batch of {e.batch_size} tokens (vLLM's "
            f"max_num_batched_tokens; context {e.max_model_len})",
        )
        yield "Runtime", f"{overhead} per GPU (CUDA context, CUDA graphs)"
        yield "Fits if", f"weights / GPUs + activations + runtime <= {e.memory_fraction:g} x GPU memory"
    elif e.mode == "serve":
        yield (
            "KV cache",
            (
                f"{e.kv_bytes_per_token / 1024:.0f} KiB/token = {e.kv_formula()}; "
                f"{e.max_model_len} tokens (max_model_len) = {fmt_bytes(e.kv_cache_bytes)}"
            ),
        )
        yield "Runtime", f"{overhead} per GPU (CUDA context, activations, CUDA graphs)"
        yield (
            "Fits if",
            (
                f"weights / GPUs + KV cache / stages + runtime <= {e.memory_fraction:g} x GPU memory "
                "(gpu_memory_utilization); tensor parallel = GPUs per node, pipeline = nodes"
            ),
        )
    else:
        yield "Trainable", f"{fmt_count(e.trainable_params)} params; {e.state_formula}"
        yield (
            "Activations",
            (
                f"{fmt_bytes(e.activation_bytes)} per GPU (batch {e.batch_size} x "
                f"{e.max_model_len} tokens, gradient checkpointing, float32 logits)"
            ),
        )
        yield "Runtime", f"{overhead} per GPU"
        yield "Fits if", f"weights + state + activations + runtime <= {e.memory_fraction:g} x GPU memory"
