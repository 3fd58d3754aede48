"""Several models on one node (``serve --name A --name B``): one vLLM each, laid out from the planner's
memory estimates.

On GPUs, each engine gets GPUs of its own where the models fit that way (no engine slows another),
else every engine spans every GPU with its share of their memory (vLLM's ``--gpu-memory-utilization``),
sized from each model's weights and KV cache. Models that fit neither way are refused before anything
launches. On CPUs the engines share the host's memory (the recipe splits the KV cache between them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llm_atc.errors import UserError
from llm_atc.planning.catalog import Offer, catalog_clouds, list_offers
from llm_atc.planning.memory import GIB, GPU_MEMORY_UTILIZATION, MemoryEstimate, estimate_memory
from llm_atc.planning.model_info import load_model_info
from llm_atc.planning.plan import AutoChoice, resolve_clouds

# A CPU engine's own memory besides weights and KV cache: Python, torch and vLLM's buffers.
CPU_ENGINE_OVERHEAD_GIB = 1.5
# The KV cache each CPU engine gets at least (the recipe gives each max(1, its share) GiB).
CPU_MIN_KV_GIB = 1


@dataclass(frozen=True)
class EngineShare:
    """Where one model's vLLM runs on the node."""

    gpus: tuple[int, ...] = ()  # GPUs of its own (CUDA_VISIBLE_DEVICES); (): every GPU, shared
    tensor_parallel: int | None = None  # None: every GPU of the node
    memory_fraction: float | None = None  # --gpu-memory-utilization; None: vLLM's default
    max_model_len: int | None = None  # the context it is sized for; None: vLLM's default


@dataclass(frozen=True)
class Layout:
    """Every engine's place on the node, and the line that says it."""

    shares: tuple[EngineShare, ...]
    summary: str

    @property
    def sequential(self) -> bool:
        """Engines that share a device start one after another: vLLM sizes its memory from what is free."""
        return not all(share.gpus for share in self.shares)


def on_gpus(estimates: Sequence[MemoryEstimate], names: Sequence[str], gpu_memory_gib: float, count: int) -> Layout:
    """GPU sets of their own when every model fits on one, else shares of every GPU; a UserError that
    gives the sums when the models do not fit together on ``count`` GPUs of ``gpu_memory_gib``."""
    own = _own_gpus(estimates, names, gpu_memory_gib, count)
    if own is not None:
        return own
    usable = gpu_memory_gib * GIB * GPU_MEMORY_UTILIZATION
    refused = [(n, e.tensor_parallel_ok(count)) for n, e in zip(names, estimates, strict=True)]
    refused = [(n, why) for n, why in refused if why]
    if refused:
        raise UserError(
            f"{' and '.join(names)} do not fit on {count} x {gpu_memory_gib:g} GiB GPUs: not one GPU set each, "
            f"and {refused[0][0]} cannot span all {count} ({refused[0][1]}); ask for more or larger GPUs "
            "(--accelerator auto finds some)"
        )
    needs = [e.need_per_gpu(count) for e in estimates]
    if sum(needs) > usable:
        parts = " + ".join(f"{n} {need / GIB:.1f}" for n, need in zip(names, needs, strict=True))
        raise UserError(
            f"{' and '.join(names)} do not fit together on {count} x {gpu_memory_gib:g} GiB GPUs: they need "
            f"{parts} = {sum(needs) / GIB:.1f} GiB per GPU, {usable / GIB:.1f} GiB usable; ask for more or "
            "larger GPUs (--accelerator auto finds some), or a shorter --max_model_len"
        )
    return _shared(estimates, names, [need / sum(needs) for need in needs], f"of {count} x {gpu_memory_gib:g} GiB")


def _own_gpus(
    estimates: Sequence[MemoryEstimate], names: Sequence[str], gpu_memory_gib: float, count: int
) -> Layout | None:
    """The fewest GPUs each model fits on (a power of two), one set per model, if they add up to ``count``."""
    sizes = []
    for estimate in estimates:
        size = 1
        while size <= count and not estimate.fit(gpu_memory_gib, size).ok:
            size *= 2
        if size > count:
            return None
        sizes.append(size)
    if sum(sizes) > count:
        return None
    shares, first = [], 0
    for size, estimate in zip(sizes, estimates, strict=True):
        gpus = tuple(range(first, first + size))
        shares.append(EngineShare(gpus, size, GPU_MEMORY_UTILIZATION, estimate.max_model_len))
        first += size
    where = ", ".join(f"{n} on GPU {','.join(map(str, s.gpus))}" for n, s in zip(names, shares, strict=True))
    return Layout(tuple(shares), f"Engines: one GPU set each ({where}).")


def _shared(estimates: Sequence[MemoryEstimate] | None, names: Sequence[str], weights: list[float], where: str):
    """Every engine on every GPU, each with ``weights[i]`` of the usable memory."""
    shares = tuple(
        EngineShare(
            memory_fraction=round(GPU_MEMORY_UTILIZATION * weight, 3),
            max_model_len=estimates[i].max_model_len if estimates else None,
        )
        for i, weight in enumerate(weights)
    )
    split = ", ".join(f"{n} {s.memory_fraction:.0%}" for n, s in zip(names, shares, strict=True))
    where = f" {where}" if where else ""
    return Layout(shares, f"Engines: sharing every GPU{where} (GPU memory: {split}); they start one after another.")


def unchecked(estimates: Sequence[MemoryEstimate] | None, names: Sequence[str], why: str) -> Layout:
    """Shares of every GPU by each model's size (equal shares without ``estimates``), where the GPUs'
    memory or the models' sizes are unknown: the fit is not checked, and the summary says why."""
    needs = [e.weight_bytes + e.kv_cache_bytes + e.overhead_bytes_per_gpu for e in estimates] if estimates else None
    weights = [need / sum(needs) for need in needs] if needs else [1 / len(names)] * len(names)
    layout = _shared(estimates, names, weights, "")
    return Layout(layout.shares, f"{layout.summary} Not checked that they fit: {why}.")


def on_cpus(estimates: Sequence[MemoryEstimate] | None, names: Sequence[str], available_bytes: int | None) -> Layout:
    """CPU engines share the host; with ``available_bytes`` known (this machine), they must fit in it."""
    if estimates and available_bytes is not None:
        needs = [e.weight_bytes + (CPU_ENGINE_OVERHEAD_GIB + CPU_MIN_KV_GIB) * GIB for e in estimates]
        if sum(needs) > available_bytes:
            parts = " + ".join(f"{n} {need / GIB:.1f}" for n, need in zip(names, needs, strict=True))
            raise UserError(
                f"{' and '.join(names)} do not fit together in this machine's memory: they need {parts} = "
                f"{sum(needs) / GIB:.1f} GiB (weights, {CPU_MIN_KV_GIB} GiB of KV cache and "
                f"{CPU_ENGINE_OVERHEAD_GIB:g} GiB of runtime each), {available_bytes / GIB:.1f} GiB is available"
            )
    shares = tuple(EngineShare() for _ in names)  # vLLM's own context length, as for one model on CPUs
    return Layout(shares, "Engines: on the CPUs, sharing the host's memory (the KV cache is split between them).")


def estimates_of(models, *, max_model_len=None, dtype=None, quantization=None) -> list[MemoryEstimate]:
    """The planner's serving estimate of each model (a ModelRef or anything ``load_model_info`` reads)."""
    return [
        estimate_memory(
            load_model_info(model),
            mode="serve",
            max_model_len=max_model_len,
            dtype=dtype,
            quantization=quantization,
        )
        for model in models
    ]


@dataclass
class JointPlan:
    """Several models on one node: each one's estimate, and the catalog offers they fit together on."""

    names: list[str]
    estimates: list[MemoryEstimate]
    clouds: list[str]
    use_spot: bool
    options: list[tuple[float, Offer, Layout]]  # (hourly price, offer, layout), cheapest first

    @property
    def auto(self) -> list[str]:
        """``--accelerator auto``: the GPU types that fit, cheapest first, all with the count of the cheapest
        (SkyPilot's any_of, one layout for all)."""
        if not self.options:
            return []
        count = self.options[0][1].count
        return list(dict.fromkeys(f"{o.accelerator}:{o.count}" for _, o, _ in self.options if o.count == count))

    def to_dict(self) -> dict:
        return {
            "models": [
                {
                    "name": n,
                    "weight_bytes": e.weight_bytes,
                    "kv_cache_bytes": e.kv_cache_bytes,
                    "max_model_len": e.max_model_len,
                }
                for n, e in zip(self.names, self.estimates, strict=True)
            ],
            "clouds": self.clouds,
            "use_spot": self.use_spot,
            "options": [
                {
                    "accelerators": f"{o.accelerator}:{o.count}",
                    "gpu_memory_gib": o.gpu_memory_gib,
                    "cloud": o.cloud,
                    "instance_type": o.instance_type,
                    "region": o.region(self.use_spot),
                    "hourly": round(price, 4),
                    "layout": layout.summary,
                }
                for price, o, layout in self.options
            ],
            "auto": self.auto,
        }


def make_plan(
    models,
    *,
    max_model_len: int | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    cloud: str | None = None,
    region: str | None = None,
    use_spot: bool = False,
) -> JointPlan:
    """Size every model and find, in SkyPilot's catalog, the single nodes that fit them all together."""
    names = [getattr(m, "name", str(m)) for m in models]
    estimates = estimates_of(models, max_model_len=max_model_len, dtype=dtype, quantization=quantization)
    clouds = resolve_clouds(cloud, region)
    best: dict[tuple, tuple] = {}  # the cheapest offer per (GPU, count)
    for offer in list_offers(clouds, region):
        price = offer.hourly(use_spot)
        if price is None or offer.gpu_memory_gib is None:
            continue
        try:
            layout = on_gpus(estimates, names, offer.gpu_memory_gib, offer.count)
        except UserError:
            continue
        key = (offer.accelerator, offer.count)
        if key not in best or price < best[key][0]:
            best[key] = (price, offer, layout)
    options = sorted(best.values(), key=lambda option: (option[0], option[1].accelerator))
    return JointPlan(names, estimates, clouds, use_spot, options)


def auto_accelerators(models, *, max_model_len: int | None = None, **options):
    """``--accelerator auto`` for several models on one node (see :attr:`JointPlan.auto`)."""
    plan = make_plan(models, max_model_len=max_model_len, **options)
    if not plan.options:
        weights = sum(e.weight_bytes for e in plan.estimates) / GIB
        raise UserError(
            f"--accelerator auto: no single node in SkyPilot's catalog ({', '.join(plan.clouds)}) fits "
            f"{' and '.join(plan.names)} together ({weights:.1f} GiB of weights before KV cache); serve them separately"
        )
    return AutoChoice(tuple(plan.auto), 1, max_model_len, plan=None)


def layout_for(spec, *, available_bytes: int | None = None) -> Layout:
    """Where each engine of ``spec`` (several models) goes on its node. Bucket models are read with the
    store settings in effect; ``available_bytes``: this machine's free memory, for CPU engines here."""
    names = spec.served_names
    estimates, why = None, ""
    try:
        estimates = estimates_of(
            spec.models,
            max_model_len=spec.max_model_len,
            dtype=spec.dtype,
            quantization=spec.quantization,
        )
    except UserError as exc:
        why = f"the models could not be sized ({str(exc).splitlines()[0][:200]})"
    accelerators = spec.placement.accelerators
    if not accelerators:
        return on_cpus(estimates, names, available_bytes)
    counts = {a.count for a in accelerators}
    if len(counts) > 1:
        raise UserError(
            f"--accelerator {spec.placement.accelerator_text}: with several --name, give GPU types of one count "
            "(e.g. A100:2,H100:2): each engine's GPUs depend on it"
        )
    if estimates is None:
        return unchecked(None, names, why)
    memory = gpu_memory([a.name for a in accelerators])
    if memory is None:
        return unchecked(
            estimates, names, f"SkyPilot's catalog here does not give the memory of {accelerators[0].name}"
        )
    return on_gpus(estimates, names, memory, counts.pop())


def gpu_memory(gpus: Sequence[str]) -> float | None:
    """GiB per GPU of the smallest of ``gpus``, from SkyPilot's catalogs on disk; None when unknown."""
    wanted = {name.lower() for name in gpus}
    try:
        clouds = catalog_clouds()
        offers = list_offers(clouds) if clouds else []
    except UserError:
        return None
    sizes: dict[str, float] = {}
    for offer in offers:
        if offer.accelerator.lower() in wanted and offer.gpu_memory_gib:
            name = offer.accelerator.lower()
            sizes[name] = min(sizes.get(name, offer.gpu_memory_gib), offer.gpu_memory_gib)
    return min(sizes.values()) if set(sizes) == wanted else None
