"""$/h of `--accelerator auto` against the old default (A100:1) and a brute-force search.

For every model config in tests/fixtures/model_configs and the catalog in tests/fixtures/catalog
(SkyPilot's CSV format, read by SkyPilot's own catalog code), prints:

- auto:   the first choice of `--accelerator auto` (llm_atc.planning.auto_accelerators);
- A100:1: the cheapest A100:1 offer, or "does not fit" when the model does not fit on it;
- brute:  the cheapest catalog row (any GPU, count, cloud and region) that fits.

Run (offline, touches nothing in your HOME):
    python benchmarks/plan_costs.py [--mode serve|full|lora|qlora] [--use_spot]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def install_catalog() -> None:
    """SkyPilot fixes its catalog path on import: point it at a copy of the fixture first."""
    runtime = Path(tempfile.mkdtemp(prefix="llm-atc-plan-bench-"))
    shutil.copytree(FIXTURES / "catalog" / "v8", runtime / ".sky" / "catalogs" / "v8")
    os.environ["SKY_RUNTIME_DIR"] = str(runtime)
    os.environ["HOME"] = str(runtime)
    os.environ["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"


def brute_force(estimate, listing: dict, use_spot: bool) -> tuple[float, str]:
    """Cheapest fitting row of the raw listing; memory from the row, the same GPU elsewhere, or
    SkyPilot's metadata.csv."""
    import csv

    from llm_atc.planning.catalog import catalog_dir

    with (catalog_dir() / "common" / "metadata.csv").open() as handle:
        metadata = {row["GPU"]: float(row["MemoryGB"]) for row in csv.DictReader(handle)}

    def known(value) -> bool:
        return value is not None and not math.isnan(value)

    best = (math.inf, "-")
    for name, rows in listing.items():
        elsewhere = [r.device_memory for r in rows if known(r.device_memory)]
        for row in rows:
            price = row.spot_price if use_spot else row.price
            if not known(price):
                continue
            memory = (
                row.device_memory if known(row.device_memory) else min(elsewhere) if elsewhere else metadata.get(name)
            )
            if memory and estimate.fit(memory, int(row.accelerator_count)).ok and price < best[0]:
                best = (price, f"{name}:{int(row.accelerator_count)} {row.cloud} {row.instance_type} {row.region}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="serve", choices=["serve", "full", "lora", "qlora"])
    parser.add_argument("--use_spot", action="store_true")
    args = parser.parse_args()
    install_catalog()
    sys.path.insert(0, str(ROOT))
    from sky import catalog as sky_catalog

    from llm_atc.errors import UserError
    from llm_atc.planning import ModelInfo, estimate_memory, plan_offers
    from llm_atc.planning.catalog import list_offers

    clouds = ["aws", "gcp", "lambda"]
    listing = sky_catalog.list_accelerators(gpus_only=True, clouds=clouds, all_regions=True)
    offers = list_offers(clouds)
    price = "spot $/h" if args.use_spot else "$/h"
    print(f"mode {args.mode}, {price}, catalog {', '.join(clouds)} (tests/fixtures/catalog)\n")
    header = f"{'model':<24} {'auto':<13} {'auto ' + price:>11} {'A100:1':>13} {'brute':>8}  brute-force offer"
    print(header)
    print("-" * (len(header) + 30))
    for path in sorted((FIXTURES / "model_configs").glob("*.config.json")):
        name = path.name.removesuffix(".config.json")
        index = FIXTURES / "model_configs" / f"{name}.safetensors.index.json"
        total = json.loads(index.read_text())["metadata"]["total_size"] if index.is_file() else None
        info = ModelInfo.from_config(json.loads(path.read_text()), name=name, index_total_size=total)
        try:
            estimate = estimate_memory(info, mode=args.mode)
        except UserError as exc:
            print(f"{name:<24} {str(exc)[:80]}")
            continue
        options, _ = plan_offers(estimate, offers, use_spot=args.use_spot, max_nodes=1)
        auto = (options[0].accelerators, f"{options[0].hourly:.3f}") if options else ("none fits", "-")
        a100 = [
            o.hourly(args.use_spot)
            for o in offers
            if (o.accelerator, o.count) == ("A100", 1) and o.hourly(args.use_spot) is not None
        ]
        fits = a100 and estimate.fit(next(o.gpu_memory_gib for o in offers if o.accelerator == "A100"), 1).ok
        a100_text = f"{min(a100):.3f}" if fits else "does not fit"
        cost, offer = brute_force(estimate, listing, args.use_spot)
        brute = f"{cost:.3f}" if cost < math.inf else "-"
        print(f"{name:<24} {auto[0]:<13} {auto[1]:>11} {a100_text:>13} {brute:>8}  {offer}")


if __name__ == "__main__":
    main()
