"""What a deployment or run costs: its hourly price when it launches (SkyPilot's catalog, or --price_per_hour; none
on hardware of your own), what the confirmation says of it and of how it ends, and the cost so far in `status`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from llm_atc.errors import UserError
from llm_atc.planning import catalog
from llm_atc.registry import PriceDetails, Record, Status

OWN_INFRA = frozenset({"local", "kubernetes", "k8s", "slurm", "ssh"})
OWN_HARDWARE = "own hardware"
ENDED = (Status.DOWN, Status.FAILED, Status.STOPPED, Status.SUCCEEDED)


@dataclass(frozen=True)
class Price:
    """Dollars per hour for the whole deployment or run (None: not known), and where the figure comes from."""

    per_hour: float | None
    source: str

    def details(self) -> PriceDetails:
        return {"per_hour": self.per_hour, "source": self.source}


def price_of(spec, *, nodes: int = 1, replicas: int = 1) -> Price:
    """A launch's price: ``--price_per_hour``, else the cheapest offer in SkyPilot's catalog of the GPUs asked for
    (times nodes and replicas; a service at its least replicas), else nothing known."""
    if spec.price_per_hour is not None:
        return Price(spec.price_per_hour, "--price_per_hour")
    placement = spec.placement
    if (placement.cloud or "") in OWN_INFRA:
        return Price(None, OWN_HARDWARE)
    if not placement.accelerators:
        return Price(None, "CPU nodes: SkyPilot's GPU catalog has no price (pass --price_per_hour)")
    use_spot = placement.use_spot
    best = cheapest_offer(
        [(a.name, a.count) for a in placement.accelerators], placement.cloud, placement.region, use_spot
    )
    if best is None:
        return Price(None, "SkyPilot's catalog here lists no such offer (pass --price_per_hour)")
    where = " ".join(str(p) for p in (best.cloud, best.instance_type, best.region(use_spot)) if p)
    count = nodes * max(replicas, 1)
    times = f" x {count}" if count > 1 else ""
    spot = ", spot" if use_spot else ""
    return Price(
        round(best.hourly(use_spot) * count, 6),
        f"SkyPilot's catalog: {best.accelerator}:{best.count} on {where}{spot}{times}",
    )


def cheapest_offer(wanted: list[tuple[str, int]], cloud: str | None, region: str | None, use_spot: bool):
    """The cheapest offer (``catalog.Offer``) in SkyPilot's catalog of any of ``wanted`` (GPU name, count);
    None where the catalog here lists none."""

    try:
        clouds = [cloud] if cloud else catalog.catalog_clouds()
        offers = catalog.list_offers(clouds, region) if clouds else []
    except UserError:
        return None
    wanted_keys = {(name.lower(), count) for name, count in wanted}
    priced = [
        (hourly, o)
        for o in offers
        if (o.accelerator.lower(), o.count) in wanted_keys and (hourly := o.hourly(use_spot)) is not None
    ]
    return min(priced, key=lambda pair: pair[0])[1] if priced else None


def confirmation(price: Price, limits, *, otherwise: str = "when you run `llm-atc down`") -> str:
    """What the question before a launch says of money and of the end: ``, about $0.70/hour (...); it ends after
    30 idle minutes`` (``otherwise``: how it ends without limits)."""
    if price.per_hour is not None:
        money = f", about ${price.per_hour:.2f}/hour ({price.source})"
    elif price.source == OWN_HARDWARE or price.source.startswith("CPU nodes"):
        money = ""
    else:
        money = f" (price unknown: {price.source})"
    return f"{money}; it ends {limits.text(otherwise)}"


def up_and_cost(record: Record, now: float | None = None) -> tuple[float, float | None]:
    """(seconds it has been up, dollars it has cost so far, None when its price is not known). An ended record
    counts until it ended (its last change)."""
    now = time.time() if now is None else now
    end = record.updated_at if record.status in ENDED else now
    seconds = max(0.0, end - record.created_at)
    per_hour = record.price.get("per_hour")
    return seconds, None if per_hour is None else round(per_hour * seconds / 3600, 4)
