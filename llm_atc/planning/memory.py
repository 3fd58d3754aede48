"""The memory formula: weights, KV cache or optimizer state, activations and runtime overhead per GPU."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_atc.errors import UserError
from llm_atc.planning.architecture import LORA_RANK, NF4_BYTES_PER_PARAM, Architecture, dtype_bytes, quantization_of
from llm_atc.planning.model_info import ModelInfo, load_model_info
from llm_atc.vllm_flags import BNB_METHODS, DTYPES, FP8_METHODS

GIB = 1024**3

MODES = ("serve", "full", "lora", "qlora")

# Serving (vLLM): the engine may use this share of each GPU for weights, activations and KV cache.
GPU_MEMORY_UTILIZATION = 0.9

# Training: leave this share for the allocator's fragmentation.
TRAIN_MEMORY_FRACTION = 0.95

# Per GPU, on top of weights and KV cache / optimizer state: CUDA context, NCCL buffers,
# CUDA graphs and the engine's activation peak (serving), or allocator slack (training).
RUNTIME_OVERHEAD_GIB = 1.5

# Tokens a pooling model (embeddings, reranking, classification) takes in one batch: vLLM's default
# max_num_batched_tokens for its OpenAI server on a large GPU.
POOLING_BATCH_TOKENS = 8192

# Full fine-tune state per parameter: on one GPU the recipe trains in bf16 (weights, grads, Adam m
# and v: 2+2+2+2 B); under FSDP it keeps fp32 master weights, grads and Adam m, v (4+4+4+4 B).
FULL_SINGLE_GPU_BYTES_PER_PARAM = 8.0

FULL_FSDP_BYTES_PER_PARAM = 16.0


@dataclass(frozen=True)
class MemoryEstimate:
    """Every term of the memory formula for one model, mode and context length."""

    model: str
    mode: str
    arch: Architecture
    params: int
    params_source: str
    params_from_config: int
    dtype: str  # what the weights are computed in
    dtype_bytes: int
    quantization: str | None
    weight_bytes: int
    weight_formula: str
    max_model_len: int  # serve: context sized for; training: sequence length
    kv_bytes_per_token: int = 0
    kv_cache_bytes: int = 0
    trainable_params: int = 0
    optimizer_bytes_per_param: float = 0.0  # training state per parameter (see state_formula)
    state_formula: str = ""
    activation_bytes: int = 0
    batch_size: int = 0
    overhead_bytes_per_gpu: int = int(RUNTIME_OVERHEAD_GIB * GIB)
    memory_fraction: float = GPU_MEMORY_UTILIZATION
    notes: tuple[str, ...] = ()
    task: str = "generate"  # serve: what the model is served for (llm_atc.model_tasks); only generate has a KV cache

    @property
    def generates(self) -> bool:
        return self.task == "generate"

    # -- fitting -------------------------------------------------------------------------------

    @property
    def multi_node(self) -> bool:
        """Whether more nodes lower the memory per GPU (pipeline stages; FSDP for full)."""
        return self.mode in ("serve", "full")

    def tensor_parallel_ok(self, count: int) -> str | None:
        """Why vLLM refuses ``count`` as its tensor parallel size, or None."""
        if self.mode != "serve":
            return None
        heads, kv = self.arch.num_heads, self.arch.num_kv_heads
        if count & (count - 1):
            return f"tensor parallel size {count} is not a power of two"
        if heads % count:
            return f"tensor parallel size {count} does not divide the {heads} attention heads"
        if not self.arch.mla and (kv % count if count <= kv else count % kv):
            return f"tensor parallel size {count} does not fit the {kv} KV heads"
        return None

    def need_per_gpu(self, count: int, nodes: int = 1) -> int:
        """Bytes each GPU needs with ``count`` GPUs per node on ``nodes`` nodes."""
        gpus = count * nodes
        overhead = self.overhead_bytes_per_gpu
        if self.mode == "serve":
            kv_heads = self.arch.num_kv_heads
            kv_share = 1.0 if self.arch.mla else math.ceil(kv_heads / count) / kv_heads
            kv = self.kv_cache_bytes * kv_share / nodes
            return int(self.weight_bytes / gpus + kv + self.activation_bytes / count + overhead)
        if self.mode == "full":
            if gpus == 1:  # bf16 weights, grads and Adam m, v (the recipe keeps bf16 on one GPU)
                state = self.params * FULL_SINGLE_GPU_BYTES_PER_PARAM
            else:  # FSDP full shard of fp32 weights, grads and Adam; two bf16 layers gathered at a time
                state = (
                    self.params * self.optimizer_bytes_per_param / gpus + 2 * 2 * self.arch.largest_layer_parameters()
                )
            return int(state + self.activation_bytes + overhead)
        # lora / qlora: every GPU holds the whole (frozen) base (DDP)
        return int(
            self.weight_bytes
            + self.trainable_params * self.optimizer_bytes_per_param
            + self.activation_bytes
            + overhead
        )

    def usable_per_gpu(self, gpu_memory_gib: float) -> int:
        return int(gpu_memory_gib * GIB * self.memory_fraction)

    def fit(self, gpu_memory_gib: float, count: int, nodes: int = 1) -> Fit:
        reason = self.tensor_parallel_ok(count)
        need, usable = self.need_per_gpu(count, nodes), self.usable_per_gpu(gpu_memory_gib)
        if reason is None and nodes > self.arch.num_layers:
            reason = f"{nodes} pipeline stages exceed the {self.arch.num_layers} layers"
        if reason is None and need > usable:
            reason = f"needs {need / GIB:.1f} GiB per GPU, {usable / GIB:.1f} GiB usable"
        return Fit(reason is None, need, usable, reason)

    # -- display -------------------------------------------------------------------------------

    def terms(self) -> dict[str, Any]:
        terms: dict[str, Any] = {
            "params": self.params,
            "params_source": self.params_source,
            "params_from_config": self.params_from_config,
            "dtype": self.dtype,
            "dtype_bytes": self.dtype_bytes,
            "quantization": self.quantization,
            "weight_bytes": self.weight_bytes,
            "weight_formula": self.weight_formula,
            "overhead_bytes_per_gpu": self.overhead_bytes_per_gpu,
            "memory_fraction": self.memory_fraction,
        }
        if self.mode == "serve" and not self.generates:
            terms.update(
                task=self.task,
                max_model_len=self.max_model_len,
                batch_tokens=self.batch_size,
                activation_bytes=self.activation_bytes,
                gpu_memory_utilization=self.memory_fraction,
            )
        elif self.mode == "serve":
            terms.update(
                task=self.task,
                max_model_len=self.max_model_len,
                kv_bytes_per_token=self.kv_bytes_per_token,
                kv_formula=self.kv_formula(),
                kv_cache_bytes=self.kv_cache_bytes,
                gpu_memory_utilization=self.memory_fraction,
            )
        else:
            terms.update(
                seq_len=self.max_model_len,
                batch_size=self.batch_size,
                trainable_params=self.trainable_params,
                state_bytes_per_param=self.optimizer_bytes_per_param,
                state_formula=self.state_formula,
                activation_bytes=self.activation_bytes,
            )
        return terms

    def kv_formula(self) -> str:
        a, b = self.arch, self.dtype_bytes
        if a.mla:
            per = (
                f"{a.num_layers} layers × ({a.mla['kv_lora_rank']} kv_lora_rank + "
                f"{a.mla['qk_rope_head_dim']} rope dims) × {b} B"
            )
        else:
            per = f"{a.num_layers} layers × {a.num_kv_heads} KV heads × {a.head_dim} head dim × 2 (K,V) × {b} B"
        if a.sliding_layers and a.sliding_window and a.sliding_window < self.max_model_len:
            per += f"; {a.sliding_layers} layers keep only a {a.sliding_window}-token window"
        return per


@dataclass(frozen=True)
class Fit:
    ok: bool
    need_bytes: int
    usable_bytes: int
    reason: str | None = None


def estimate_memory(
    model: ModelInfo | Mapping | str,
    *,
    mode: str = "serve",
    max_model_len: int | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    train_envs: Mapping[str, str] | None = None,
    task: str | None = None,
) -> MemoryEstimate:
    """The memory terms of ``model`` (a :class:`ModelInfo`, a config dict, or anything
    :func:`load_model_info` reads) served or fine-tuned in ``mode``; a fine-tune is sized with its
    recipe's sequence length, batch size and LoRA rank (``train_envs`` overrides them, as ``--envs`` does).
    ``task``: what a served model is for (default: what the model says, see ``llm_atc.model_tasks``); an
    embedding, reranking or classification model has no KV cache, only the activations of one batch."""
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if max_model_len is not None and max_model_len < 1:
        raise UserError(f"--max_model_len {max_model_len}: must be a positive number of tokens")
    info = load_model_info(model)
    arch = Architecture.from_config(info.config, where=f"config.json of {info.name}")
    if mode != "serve":
        if dtype not in (None, "auto"):
            raise UserError(f"--dtype applies to --mode serve; --mode {mode} trains in bfloat16")
        if quantization:
            raise UserError(
                f"--quantization applies to --mode serve; --mode {mode} loads the weights in "
                "bfloat16" + (" and quantizes them to 4-bit NF4 itself" if mode == "qlora" else "")
            )
        if arch.quantization_config:
            method = arch.quantization_config.get("quant_method", "quantized")
            raise UserError(f"{info.name} is a {method} checkpoint; fine-tune its unquantized base model instead")
    notes = []
    counts = arch.parameter_counts()
    from_config = sum(counts.values())
    linear = counts["attention"] + counts["mlp"] + counts["experts"] + counts["shared_experts"]
    checkpoint_bytes = dtype_bytes(arch.checkpoint_dtype)
    quant = quantization_of(arch, quantization) if mode == "serve" else None
    params, params_source = from_config, "config"
    if info.index_total_size and checkpoint_bytes and not arch.quantization_config:
        params, params_source = int(info.index_total_size / checkpoint_bytes), "safetensors index"
    other = max(0, params - linear)  # embeddings, lm_head, norms, router (and any vision tower)

    if dtype in ("float", "float32"):
        dtype_name, nbytes = "float32", 4
    elif dtype in ("half", "float16", "bfloat16"):
        dtype_name, nbytes = ("float16" if dtype == "half" else dtype), 2
    else:  # auto: the checkpoint's 16-bit dtype; vLLM casts float32 checkpoints to 16 bits
        dtype_name = (arch.checkpoint_dtype or "bfloat16") if checkpoint_bytes == 2 else "bfloat16"
        nbytes = 2
    if mode != "serve":
        dtype_name, nbytes = "bfloat16", 2

    if mode == "serve":
        length = max_model_len or arch.default_max_model_len()
        if arch.max_position_embeddings and length > arch.max_position_embeddings:
            notes.append(
                f"--max_model_len {length} exceeds the model's {arch.max_position_embeddings} positions; "
                "vLLM refuses it unless RoPE scaling allows it"
            )
        if quant is None:
            weights = params * nbytes
            formula = f"{fmt_count(params)} params × {nbytes} B ({dtype_name})"
        elif arch.quantization_config and info.index_total_size and quant.from_checkpoint:
            weights = info.index_total_size
            formula = f"{quant.method} checkpoint: safetensors total_size {fmt_bytes(weights)}"
        elif quant.bits >= 16:
            raise UserError(
                f"cannot size {info.name}'s {quant.method} weights without a safetensors index; "
                "pass a folder with model.safetensors.index.json"
            )
        else:
            weights = int(linear * quant.bytes_per_param + other * nbytes)
            formula = (
                f"{fmt_count(linear)} linear params × {quant.bytes_per_param:.3f} B ({quant.method}, "
                f"{quant.bits:g}-bit, group {quant.group_size}) + {fmt_count(other)} others × {nbytes} B"
            )
            if not quant.from_checkpoint and quant.method not in FP8_METHODS | BNB_METHODS:
                notes.append(
                    f"--quantization {quant.method} needs a {quant.method} checkpoint; vLLM quantizes "
                    "on the fly only for fp8 and bitsandbytes"
                )
        task = task or info.task
        if task == "generate":
            kv_token = arch.num_layers * arch.kv_elements_per_token_per_layer() * nbytes
            kv_cache = arch.kv_cache_tokens(length) * arch.kv_elements_per_token_per_layer() * nbytes
            batch_tokens = activations = 0
        else:  # a pooling model keeps nothing between requests: one batch's activations
            kv_token = kv_cache = 0
            batch_tokens = max(POOLING_BATCH_TOKENS, length)
            activations = _pooling_activation_bytes(arch, batch_tokens, nbytes)
        return MemoryEstimate(
            model=info.name,
            mode=mode,
            arch=arch,
            params=params,
            params_source=params_source,
            params_from_config=from_config,
            dtype=dtype_name,
            dtype_bytes=nbytes,
            quantization=quant.method if quant else None,
            weight_bytes=int(weights),
            weight_formula=formula,
            max_model_len=length,
            kv_bytes_per_token=kv_token,
            kv_cache_bytes=kv_cache,
            activation_bytes=activations,
            batch_size=batch_tokens,
            memory_fraction=GPU_MEMORY_UTILIZATION,
            notes=tuple(notes),
            task=task,
        )

    from llm_atc.recipes_catalog import train_settings

    settings = train_settings(mode, dict(train_envs or {}))
    seq, batch_size, lora_rank = (
        max_model_len or settings["MAX_SEQ_LEN"],
        settings["BATCH_SIZE"],
        settings.get("LORA_R", LORA_RANK),
    )
    activations = _activation_bytes(arch, seq * batch_size)
    if mode == "full":
        weights = params * 2
        return MemoryEstimate(
            model=info.name,
            mode=mode,
            arch=arch,
            params=params,
            params_source=params_source,
            params_from_config=from_config,
            dtype=dtype_name,
            dtype_bytes=2,
            quantization=None,
            weight_bytes=weights,
            weight_formula=f"{fmt_count(params)} params × 2 B (bfloat16)",
            max_model_len=seq,
            trainable_params=params,
            optimizer_bytes_per_param=FULL_FSDP_BYTES_PER_PARAM,
            state_formula="1 GPU: bf16 weights + bf16 grads + bf16 Adam m, v = 8 B/param; "
            "FSDP on N GPUs: (fp32 weights + fp32 grads + fp32 Adam m, v) 16 B/param / N",
            activation_bytes=activations,
            batch_size=batch_size,
            memory_fraction=TRAIN_MEMORY_FRACTION,
        )
    trainable = arch.lora_parameters(lora_rank)
    if mode == "lora":
        weights = params * 2
        formula = f"{fmt_count(params)} frozen params × 2 B (bfloat16)"
    else:
        weights = int(linear * NF4_BYTES_PER_PARAM + other * 4)
        formula = (
            f"{fmt_count(linear)} linear params × {NF4_BYTES_PER_PARAM:.3f} B (NF4, double quant) + "
            f"{fmt_count(other)} others × 4 B (float32 after prepare_model_for_kbit_training)"
        )
    return MemoryEstimate(
        model=info.name,
        mode=mode,
        arch=arch,
        params=params,
        params_source=params_source,
        params_from_config=from_config,
        dtype=dtype_name,
        dtype_bytes=2,
        quantization="nf4" if mode == "qlora" else None,
        weight_bytes=weights,
        weight_formula=formula,
        max_model_len=seq,
        trainable_params=trainable,
        optimizer_bytes_per_param=16.0,
        state_formula=f"LoRA r={lora_rank} on every linear layer: fp32 adapter weights + grads + Adam m, v "
        "= 16 B per trainable param",
        activation_bytes=activations,
        batch_size=batch_size,
        memory_fraction=TRAIN_MEMORY_FRACTION,
    )


def _pooling_activation_bytes(arch: Architecture, tokens: int, nbytes: int) -> int:
    """One forward pass of a batch of ``tokens`` through a pooling model (no gradients, nothing kept
    between layers): the largest layer's intermediates, and the float32 pooled outputs."""
    h, inner = arch.hidden_size, arch.intermediate_size
    return int(tokens * (4 * h + inner) * nbytes + tokens * h * 4)


def _activation_bytes(arch: Architecture, tokens: int) -> int:
    """Activation memory of one training step with gradient checkpointing (the recipe's default):
    each layer's bf16 input, one layer recomputed, and the float32 logits and their gradient."""
    h = arch.hidden_size
    inner = arch.intermediate_size
    if arch.is_moe:
        inner = arch.moe_intermediate_size * arch.experts_per_token + arch.shared_expert_intermediate_size
    checkpoints = arch.num_layers * tokens * h * 2
    one_layer = tokens * (8 * h + 4 * inner) * 2
    logits = tokens * arch.vocab_size * 8
    return int(checkpoints + one_layer + logits)


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB"
