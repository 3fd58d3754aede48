"""GPU names we accept in ``--accelerator``, read without importing SkyPilot.

The names are SkyPilot's own: its offline list ``sky/utils/gpu_names.py`` (loaded by
file path, so ``import sky`` and its seconds of start-up are not paid), plus the
catalog it downloads on first use (``~/.sky/catalogs/v8/common/accelerators.csv``).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

# Infra where administrators name GPUs themselves, so any name may be valid.
CUSTOM_GPU_INFRA = frozenset({"kubernetes", "k8s", "slurm", "ssh"})


def catalog_file() -> Path:
    root = Path(os.environ.get("SKY_RUNTIME_DIR") or Path.home())
    return root / ".sky" / "catalogs" / "v8" / "common" / "accelerators.csv"


def skypilot_gpu_names() -> list[str]:
    """``sky.utils.gpu_names.CANONICAL_GPU_NAMES`` (that module imports only ``re``)."""
    sky_spec = importlib.util.find_spec("sky")
    path = Path(sky_spec.origin).parent / "utils" / "gpu_names.py"
    module_spec = importlib.util.spec_from_file_location("llm_atc_sky_gpu_names", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return list(module.CANONICAL_GPU_NAMES)


def known_gpus() -> list[str]:
    """GPU names from SkyPilot's offline list and, when downloaded, its catalog."""
    names = set(skypilot_gpu_names())
    path = catalog_file()
    if path.is_file():
        with path.open(newline="") as handle:
            names.update(row["AcceleratorName"] for row in csv.DictReader(handle) if row.get("AcceleratorName"))
    return sorted(names)
