"""Right-sizing: how much GPU memory a model needs, which GPUs fit it, and what they cost.

Three steps, each usable on its own:

1. :func:`load_model_info` reads ``config.json`` (and ``model.safetensors.index.json``
   when there is one) from the Hugging Face Hub, a local folder or our bucket.
2. :func:`estimate_memory` turns it into a :class:`MemoryEstimate`: parameters,
   weight bytes, KV cache (serve) or optimizer state and activations (training),
   and the runtime overhead per GPU, with every term kept for display.
3. :func:`make_plan` reads GPU offers and prices from SkyPilot's own catalog
   (``sky.catalog.list_accelerators``), finds for each GPU type the smallest
   count per node (and, past one node, the pipeline stages) that fits, and sorts
   the offers by $/h. :func:`auto_accelerators`
   gives ``--accelerator auto`` the feasible set, cheapest first.

Nothing here imports SkyPilot or huggingface_hub until a step needs it.
"""

from __future__ import annotations

from llm_atc.planning.architecture import Architecture
from llm_atc.planning.memory import GIB, GPU_MEMORY_UTILIZATION, MemoryEstimate, estimate_memory
from llm_atc.planning.model_info import ModelInfo, load_model_info
from llm_atc.planning.plan import AutoChoice, auto_accelerators, iter_terms, make_plan, plan_offers

__all__ = [
    "Architecture",
    "AutoChoice",
    "GIB",
    "GPU_MEMORY_UTILIZATION",
    "MemoryEstimate",
    "ModelInfo",
    "auto_accelerators",
    "estimate_memory",
    "iter_terms",
    "load_model_info",
    "make_plan",
    "plan_offers",
]
