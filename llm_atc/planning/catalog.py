"""SkyPilot's GPU catalog, read-only and offline (for `llm-atc plan`, --accelerator auto and prices): the offers
of the clouds whose catalog is on disk, with each GPU's memory."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_atc.errors import UserError
from llm_atc.sky_sdk import import_sky, one_line, quiet_sky


@dataclass(frozen=True)
class Offer:
    """One instance type with GPUs, at its cheapest region (on-demand and spot apart)."""

    cloud: str
    instance_type: str | None
    accelerator: str
    count: int
    gpu_memory_gib: float | None
    memory_source: str | None
    price: float | None
    price_region: str | None
    spot_price: float | None
    spot_region: str | None

    def hourly(self, use_spot: bool) -> float | None:
        return self.spot_price if use_spot else self.price

    def region(self, use_spot: bool) -> str | None:
        return self.spot_region if use_spot else self.price_region


def number(value: Any) -> float | None:
    try:
        parsed = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(parsed) else parsed


def catalog_dir() -> Path:
    """Where SkyPilot reads its catalog: ``${SKY_RUNTIME_DIR:-~}/.sky/catalogs/v8`` (fixed when
    SkyPilot is imported)."""
    import_sky()
    from sky.catalog import common

    return Path(common.get_catalog_path("x")).parent


def catalog_clouds() -> list[str]:
    """Clouds whose GPU catalog is already on disk (listing others would try to download them)."""
    from sky.skylet import constants

    root = catalog_dir()
    return [cloud for cloud in constants.ALL_CLOUDS if (root / cloud / "vms.csv").is_file()]


def list_offers(clouds: list[str], region: str | None = None) -> list[Offer]:
    """GPU offers of ``clouds`` from SkyPilot's catalog, one per (cloud, instance
    type, GPU, count), each at its cheapest region on-demand and its cheapest region on spot."""
    import_sky()
    from sky.utils import accelerator_registry

    try:
        listing = _list_accelerators(
            clouds, all_regions=True, region_filter=f"^{re.escape(region)}$" if region else None
        )
    except Exception as exc:
        raise UserError(
            f"cannot read SkyPilot's GPU catalog for {', '.join(clouds)}: {one_line(exc)} "
            f"(SkyPilot downloads it to {catalog_dir()} on first use; run `sky gpus list` once online)"
        ) from None
    grouped: dict[tuple, list] = {}
    for name, infos in listing.items():
        if accelerator_registry.is_schedulable_non_gpu_accelerator(name) or name.lower().startswith("tpu"):
            continue
        for info in infos:
            count = number(info.accelerator_count)
            if not count or count != int(count):
                continue  # fractional GPUs
            key = (info.cloud, info.instance_type, name, int(count))
            grouped.setdefault(key, []).append(info)
    memory = _device_memory(listing, _other_catalogs(listing, clouds))
    offers = []
    for (cloud, instance_type, name, count), infos in grouped.items():
        priced = [(p, i.region) for i in infos if (p := number(i.price)) is not None]
        spot = [(p, i.region) for i in infos if (p := number(i.spot_price)) is not None]
        price, price_region = min(priced) if priced else (None, None)
        spot_price, spot_region = min(spot) if spot else (None, None)
        own = [m for i in infos if (m := number(i.device_memory))]
        gib, source = (min(own), "catalog GpuInfo") if own else memory.get(name, (None, None))
        offers.append(
            Offer(str(cloud), instance_type, name, count, gib, source, price, price_region, spot_price, spot_region)
        )
    return sorted(offers, key=lambda o: (o.accelerator, o.count, o.cloud, o.price or math.inf))


def _other_catalogs(listing: Mapping[str, list], clouds: list[str]) -> Mapping[str, list]:
    """GPUs whose rows carry no memory (GCP's GpuInfo is just the name), as listed by the catalogs
    of the other clouds already on disk (never downloaded); empty when there are none."""
    missing = [name for name, infos in listing.items() if not any(number(i.device_memory) for i in infos)]
    others = [c for c in catalog_clouds() if c not in {x.lower() for x in clouds}]
    if not missing or not others:
        return {}
    try:
        return _list_accelerators(others, name_filter="^(?:" + "|".join(map(re.escape, missing)) + ")$")
    except Exception:
        return {}


def _list_accelerators(clouds: list[str], **filters) -> dict[str, list]:
    """SkyPilot's GPU catalog rows of ``clouds`` by GPU name, one cloud at a time: with several,
    SkyPilot reads the catalogs on a thread pool, which was seen to hang for good in a test process.

    Each read is one request, as in SkyPilot's API server: the cloud identity it looked up (AWS's
    catalog maps zones per account) is forgotten afterwards, so credentials that were in the
    environment then (``--envs`` store settings) are never used by a later read."""
    from sky import catalog
    from sky.utils import annotations

    listing: dict[str, list] = {}
    try:
        with quiet_sky():
            for cloud in clouds:
                found = catalog.list_accelerators(gpus_only=True, clouds=[cloud], case_sensitive=False, **filters)
                for name, infos in found.items():
                    listing.setdefault(name, []).extend(infos)
    finally:
        annotations.clear_request_level_cache()
    return listing


def _device_memory(
    listing: Mapping[str, list], elsewhere: Mapping[str, list] | None = None
) -> dict[str, tuple[float, str]]:
    """GPU memory (GiB) per accelerator name, for offers whose own row has none (GCP's GpuInfo is
    just the name): the catalog's GpuInfo of that GPU on another cloud (listed, or on disk), else
    the catalog's ``common/metadata.csv``, else ``sky.utils.gpu_names`` (which SkyPilot uses for
    memory variants)."""
    import csv

    from sky.utils import gpu_names

    found: dict[str, tuple[float, str]] = {}
    elsewhere = elsewhere or {}
    for name in listing:
        sizes = [m for i in [*listing[name], *elsewhere.get(name, [])] if (m := number(i.device_memory))]
        if sizes:
            found[name] = (min(sizes), "catalog GpuInfo (another cloud)")
    metadata = catalog_dir() / "common" / "metadata.csv"
    table: dict[str, float] = {}
    if metadata.is_file():
        with metadata.open(newline="") as handle:
            for row in csv.DictReader(handle):
                size = number(row.get("MemoryGB"))
                if row.get("GPU") and size:
                    table[row["GPU"].lower()] = size
    for name in listing:
        if name in found:
            continue
        if name.lower() in table:
            found[name] = (table[name.lower()], "catalog metadata.csv")
        elif (size := gpu_names.get_gpu_device_memory_gib(name)) is not None:
            found[name] = (float(size), "sky.utils.gpu_names")
    return found
