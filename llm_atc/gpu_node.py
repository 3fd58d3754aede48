"""What a GPU node needs for the vLLM llm-atc pins, and what the recipe checks there before installing it.

The facts are data (``data/gpu-node.json``, written by ``scripts/gpu_node.py`` from a resolution of the
recipe's engine set against the public package index): the torch and CUDA runtime that set pulls, the
NVIDIA driver that runtime needs and the oldest glibc it installs on. The recipe gets them as envs and
stops in one line on a node that cannot run them, before it downloads gigabytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from llm_atc.errors import UserError

# The oldest Linux driver each CUDA major runs on (NVIDIA's minor-version compatibility table).
MIN_DRIVER = {12: "525.60.13", 13: "580.65.06"}
# Installed with vLLM, unused by the models llm-atc serves, and not built for the torch it pins.
REMOVED_AFTER_INSTALL = ("torchaudio", "torchcodec")
# `--envs VLLM_CUDA_VARIANT=cu129`: vLLM's build for another CUDA release (from its GitHub release, with
# torch from PyTorch's index of that CUDA release) instead of the one on PyPI.
VARIANT = re.compile(r"cu(1[23])(\d)")
OLDER_VARIANT = "cu129"


@lru_cache(maxsize=1)
def facts() -> dict:
    return json.loads(resources.files("llm_atc").joinpath("data/gpu-node.json").read_text())


@dataclass(frozen=True)
class NodeGpus:
    """The GPUs a node was planned with: how many, and the memory of the smallest (None: not in the catalog)."""

    count: int
    memory_gib: float | None = None


def driver_envs(variant: str | None) -> dict[str, str]:
    """The recipe's GPU_CUDA and GPU_MIN_DRIVER for vLLM's default build (``variant`` None or empty) or for
    ``--envs VLLM_CUDA_VARIANT=cuXYZ``; UserError for a variant that is not a CUDA release."""
    if not variant:
        return {"GPU_CUDA": facts()["cuda"], "GPU_MIN_DRIVER": facts()["min_driver"]}
    match = VARIANT.fullmatch(variant)
    if match is None:
        raise UserError(
            f"--envs VLLM_CUDA_VARIANT={variant}: name one of vLLM's CUDA builds such as {OLDER_VARIANT} "
            f"(CUDA 12.9, driver {MIN_DRIVER[12]} or newer); empty means the PyPI build (CUDA {facts()['cuda']})"
        )
    major = int(match.group(1))
    return {"GPU_CUDA": f"{major}.{match.group(2)}", "GPU_MIN_DRIVER": MIN_DRIVER[major]}


def gpu_envs(gpus: NodeGpus | None) -> dict[str, str]:
    """GPU_COUNT and GPU_MEMORY_MIB: what the recipe compares with what nvidia-smi lists on the node."""
    if gpus is None:
        return {}
    memory = "" if gpus.memory_gib is None else str(int(gpus.memory_gib * 1024))
    return {"GPU_COUNT": str(gpus.count), "GPU_MEMORY_MIB": memory}
