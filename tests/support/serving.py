"""The command line of a small vLLM deployment on this machine (vLLM's CPU build, the tiny model)."""

from __future__ import annotations


def local_vllm(model: str, cluster: str, *extra: str) -> list[str]:
    """`llm-atc serve` of ``model`` as ``cluster`` with vLLM here: a free port, a small context and KV cache, eager
    mode (no compile step), a bounded wait; ``extra`` options after those."""
    return [
        "serve", "--name", model, "--cloud", "local", "--engine", "vllm", "--port", "0", "-c", cluster,
        "--max_model_len", "256", "--vllm_args", "--enforce-eager", "--envs", "VLLM_CPU_KVCACHE_SPACE=1",
        "--timeout", "600", *extra,
    ]  # fmt: skip
