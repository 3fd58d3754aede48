"""GPU names we accept in ``--accelerator``, read without importing SkyPilot.

The source of truth is SkyPilot's catalog (``~/.sky/catalogs/v8/common/accelerators.csv``),
which SkyPilot downloads on first use. Before that, a short list of the GPUs the
public clouds offer keeps validation working offline.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

COMMON_GPUS = (
    "A10", "A10G", "A100", "A100-80GB", "A40", "B200", "GB200", "H100", "H100-MEGA", "H100-NVL",
    "H200", "K80", "L4", "L40", "L40S", "M60", "MI300X", "P100", "P4", "RTX4090", "RTX6000",
    "RTXPRO6000", "T4", "V100", "V100-32GB",
)

# Infra where administrators name GPUs themselves, so any name may be valid.
CUSTOM_GPU_INFRA = frozenset({"kubernetes", "slurm", "ssh"})


def catalog_file() -> Path:
    root = Path(os.environ.get("SKY_RUNTIME_DIR") or Path.home())
    return root / ".sky" / "catalogs" / "v8" / "common" / "accelerators.csv"


def known_gpus() -> list[str]:
    """GPU names from SkyPilot's catalog when present, plus the common ones."""
    names = set(COMMON_GPUS)
    path = catalog_file()
    if path.is_file():
        with path.open(newline="") as handle:
            names.update(row["AcceleratorName"] for row in csv.DictReader(handle) if row.get("AcceleratorName"))
    return sorted(names)
