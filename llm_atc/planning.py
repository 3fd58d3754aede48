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

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_atc.catalog import Offer, catalog_clouds, catalog_dir, list_offers
from llm_atc.errors import NotFoundError, UserError
from llm_atc.hub import hub_file
from llm_atc.model_files import ModelFiles, has_sentence_transformers
from llm_atc.storage import RUN_BASE

if TYPE_CHECKING:
    from llm_atc.models import ModelRef
    from llm_atc.registry import Registry
    from llm_atc.storage import BucketURI, ObjectStore

GIB = 1024**3
MODES = ("serve", "full", "lora", "qlora")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")  # what vLLM's --dtype accepts

# Serving (vLLM): the engine may use this share of each GPU for weights, activations and KV cache.
GPU_MEMORY_UTILIZATION = 0.9
# Training: leave this share for the allocator's fragmentation.
TRAIN_MEMORY_FRACTION = 0.95
# Per GPU, on top of weights and KV cache / optimizer state: CUDA context, NCCL buffers,
# CUDA graphs and the engine's activation peak (serving), or allocator slack (training).
RUNTIME_OVERHEAD_GIB = 1.5
# Without --max_model_len, serving is sized for the model's context, at most this.
MAX_MODEL_LEN_CAP = 32768
# Tokens a pooling model (embeddings, reranking, classification) takes in one batch: vLLM's default
# max_num_batched_tokens for its OpenAI server on a large GPU.
POOLING_BATCH_TOKENS = 8192
# The training recipe's defaults (recipes/train/finetune.py: MAX_SEQ_LEN, BATCH_SIZE, LORA_R).
# Training's sequence length, batch size and LoRA rank are the recipes' (recipes_catalog.train_settings).
LORA_RANK = 16  # peft's default, for LoRA parameters outside a training plan
# Full fine-tune state per parameter: on one GPU the recipe trains in bf16 (weights, grads, Adam m
# and v: 2+2+2+2 B); under FSDP it keeps fp32 master weights, grads and Adam m, v (4+4+4+4 B).
FULL_SINGLE_GPU_BYTES_PER_PARAM = 8.0
FULL_FSDP_BYTES_PER_PARAM = 16.0
# Most nodes a plan may span (vLLM pipeline stages, or FSDP nodes for a full fine-tune).
MAX_NODES = 8
# Only full nodes (this many GPUs or more) are stretched over several nodes.
MULTI_NODE_MIN_GPUS = 8

_NON_GATED_MLP = frozenset(
    {
        "gpt2",
        "gpt_bigcode",
        "gptj",
        "gpt_neo",
        "gpt_neox",
        "opt",
        "falcon",
        "bloom",
        "phi",
        "starcoder2",
        "mpt",
        "codegen",
    }
)
_TIED_BY_DEFAULT = frozenset(
    {"gpt2", "gpt_bigcode", "gpt_neo", "opt", "bloom", "gemma", "gemma2", "gemma3", "gemma3_text"}
)
_QKV_BIAS = frozenset({"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"})

# Quantization methods, by how vLLM stores their weights.
_INT_METHODS = frozenset(
    {
        "awq",
        "awq_marlin",
        "gptq",
        "gptq_marlin",
        "gptq_marlin_24",
        "marlin",
        "gptq_bitblas",
        "awq_triton",
        "squeezellm",
        "moe_wna16",
        "auto-round",
        "auto_round",
        "inc",
    }
)
_FP8_METHODS = frozenset({"fp8", "fbgemm_fp8", "ptpc_fp8", "modelopt", "fp8_e4m3"})
_BNB_METHODS = frozenset({"bitsandbytes", "bnb"})
_MXFP4_METHODS = frozenset({"mxfp4"})
QUANTIZATIONS = tuple(sorted(_INT_METHODS | _FP8_METHODS | _BNB_METHODS | _MXFP4_METHODS | {"compressed-tensors"}))
# bitsandbytes NF4 with double quantization: 4 bits plus an 8-bit absmax per 64 weights.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64


# --------------------------------------------------------------------------------------------
# 1. Reading a model's config


@dataclass(frozen=True)
class ModelInfo:
    """A model's ``config.json`` and, when published, its safetensors index size."""

    name: str
    config: dict
    source: str  # where it was read: "Hugging Face Hub", a folder, a bucket URI
    index_total_size: int | None = None  # ``metadata.total_size`` of model.safetensors.index.json
    adapter_of: str | None = None  # a LoRA adapter's base model (the config is the base's)
    sentence_transformers: bool = False  # it carries sentence-transformers' files: an embedding model

    @property
    def task(self) -> str:
        """What the model is served for (``llm_atc.model_tasks``): a LoRA adapter generates."""
        from llm_atc.model_tasks import GENERATE, detect_task

        if self.adapter_of:
            return GENERATE
        return detect_task(self.config, sentence_transformers=self.sentence_transformers).task

    @classmethod
    def from_config(
        cls, config: Mapping, *, name: str | None = None, index_total_size: int | None = None, source: str = "config"
    ) -> ModelInfo:
        return cls(name or str(config.get("_name_or_path") or "model"), dict(config), source, index_total_size)


def load_model_info(
    model: str | ModelRef | ModelInfo | Mapping,
    *,
    source: str | None = None,
    registry: Registry | None = None,
    store: ObjectStore | None = None,
) -> ModelInfo:
    """Read the config of ``model``: a Hub id, ``llm-atc/<run>``, a folder, a :class:`ModelRef`,
    or an already-read config dict / :class:`ModelInfo` (returned as is)."""
    if isinstance(model, ModelInfo):
        return model
    if isinstance(model, Mapping):
        return ModelInfo.from_config(model)
    from llm_atc.models import ModelRef, resolve_model

    ref = model if isinstance(model, ModelRef) else resolve_model(model, source, registry)
    if ref.path is not None:
        return _from_folder(ref.name, Path(ref.path))
    if ref.bucket is not None:
        return _from_bucket(ref.name, ref.bucket, store)
    return _from_hub(ref.hub_id or ref.name)


def _parse_json(text: str, where: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where} does not hold a JSON object")
    return data


def _index_size(index: dict | None) -> int | None:
    size = ((index or {}).get("metadata") or {}).get("total_size")
    try:
        return int(size) if size else None
    except (TypeError, ValueError):
        return None


def _adapter_base(adapter: dict, where: str) -> str:
    base = adapter.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{where} names no base_model_name_or_path, so the base model cannot be sized")
    return str(base)


def _from_folder(name: str, folder: Path) -> ModelInfo:
    if not folder.is_dir():
        raise NotFoundError(f"--name {name!r}: no such folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        adapter_path = folder / "adapter_config.json"
        if adapter_path.is_file():
            base = _adapter_base(_parse_json(adapter_path.read_text(), str(adapter_path)), str(adapter_path))
            if base == RUN_BASE:  # an adapter run that carries its base
                base = str(folder / RUN_BASE)
            info = load_model_info(str(Path(base).expanduser()) if Path(base).expanduser().is_dir() else base)
            return ModelInfo(info.name, info.config, info.source, info.index_total_size, adapter_of=info.name)
        raise UserError(f"--name {name!r}: the folder holds no config.json or adapter_config.json")
    config = _parse_json(config_path.read_text(), str(config_path))
    index_path = folder / "model.safetensors.index.json"
    index = _parse_json(index_path.read_text(), str(index_path)) if index_path.is_file() else None
    st = has_sentence_transformers(ModelFiles(folder=folder))
    return ModelInfo(name, config, f"folder {folder}", _index_size(index), sentence_transformers=st)


def _from_bucket(name: str, uri: BucketURI, store: ObjectStore | None) -> ModelInfo:
    from llm_atc.storage import ObjectStore

    store = store or ObjectStore(uri.scheme)
    try:
        config = _parse_json(store.read_text(uri.child("config.json")), f"{uri}/config.json")
    except NotFoundError:
        try:
            adapter = _parse_json(store.read_text(uri.child("adapter_config.json")), f"{uri}/adapter_config.json")
        except NotFoundError:
            raise NotFoundError(f"{uri} holds no config.json or adapter_config.json") from None
        base = _adapter_base(adapter, f"{uri}/adapter_config.json")
        info = _from_bucket(name, uri.child(RUN_BASE), store) if base == RUN_BASE else load_model_info(base)
        return ModelInfo(info.name, info.config, info.source, info.index_total_size, adapter_of=info.name)
    try:
        index = _parse_json(store.read_text(uri.child("model.safetensors.index.json")), f"{uri}/index")
    except (NotFoundError, UserError):
        index = None
    st = has_sentence_transformers(ModelFiles(bucket=uri, store=store))
    return ModelInfo(name, config, str(uri), _index_size(index), sentence_transformers=st)


def _from_hub(repo_id: str) -> ModelInfo:
    path = hub_file(repo_id, "config.json")
    config = _parse_json(Path(path).read_text(), f"{repo_id}/config.json")
    index = None
    try:
        index_path = hub_file(repo_id, "model.safetensors.index.json")
        index = _parse_json(Path(index_path).read_text(), f"{repo_id}/model.safetensors.index.json")
    except UserError:
        pass  # single-file checkpoints have no index; the config alone is enough
    st = has_sentence_transformers(ModelFiles(hub_id=repo_id))
    return ModelInfo(repo_id, config, "Hugging Face Hub", _index_size(index), sentence_transformers=st)


# --------------------------------------------------------------------------------------------
# 2. The model's shape and memory


def _get(config: Mapping, *names: str, default: Any = None) -> Any:
    for name in names:
        value = config.get(name)
        if value is not None:
            return value
    return default


def _text_config(config: Mapping) -> dict:
    """The language model's config (multimodal configs nest it as ``text_config``)."""
    merged = dict(config)
    for key in ("text_config", "llm_config", "language_config"):
        nested = config.get(key)
        if isinstance(nested, dict) and "hidden_size" in nested:
            merged = {**merged, **{k: v for k, v in nested.items() if v is not None}}
            break
    return merged


@dataclass(frozen=True)
class Architecture:
    """What sizing needs from ``config.json``."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    gated_mlp: bool
    qkv_bias: bool
    max_position_embeddings: int | None
    checkpoint_dtype: str | None
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: int = 0
    mla: Mapping | None = None  # kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim, q_lora_rank
    sliding_window: int | None = None
    sliding_layers: int = 0
    quantization_config: Mapping | None = None

    @classmethod
    def from_config(cls, config: Mapping, *, where: str = "config.json") -> Architecture:
        cfg = _text_config(config)
        fields_ = {
            "hidden_size": _get(cfg, "hidden_size", "n_embd", "d_model", "dim"),
            "num_hidden_layers": _get(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers"),
            "num_attention_heads": _get(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads"),
            "vocab_size": _get(cfg, "vocab_size", "padded_vocab_size"),
        }
        missing = [name for name, value in fields_.items() if not isinstance(value, int) or value <= 0]
        if missing:
            raise UserError(
                f"{where} lacks {', '.join(missing)}: cannot size the model "
                "(llm-atc plan sizes decoder-only language models)"
            )
        hidden, layers, heads, vocab = fields_.values()
        model_type = str(cfg.get("model_type") or "")
        if cfg.get("multi_query") is True:
            kv_heads = 1
        else:
            kv_heads = int(
                _get(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num", default=heads)
            )
        head_dim = cfg.get("head_dim")
        head_dim = int(head_dim) if isinstance(head_dim, int) and head_dim > 0 else hidden // heads
        intermediate = int(_get(cfg, "intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim", default=4 * hidden))
        tied = cfg.get("tie_word_embeddings")
        if tied is None:
            tied = model_type in _TIED_BY_DEFAULT
        max_pos = _get(
            cfg, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "model_max_length"
        )
        dtype = _get(cfg, "torch_dtype", "dtype") or _get(config, "torch_dtype", "dtype")
        experts = int(
            _get(cfg, "num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts", default=0) or 0
        )
        moe = {}
        if experts > 1:
            moe_inter = int(_get(cfg, "moe_intermediate_size", default=intermediate))
            shared = cfg.get("shared_expert_intermediate_size")
            if shared is None:
                shared = int(cfg.get("n_shared_experts") or 0) * moe_inter
            dense_layers = int(cfg.get("first_k_dense_replace") or 0)
            mlp_only = cfg.get("mlp_only_layers") or []
            dense_layers += len(mlp_only) if isinstance(mlp_only, list) else 0
            step = int(_get(cfg, "decoder_sparse_step", "moe_layer_freq", default=1) or 1)
            moe_layers = (
                len([i for i in range(dense_layers, layers) if (i + 1) % step == 0])
                if step > 1
                else layers - dense_layers
            )
            moe = dict(
                num_experts=experts,
                experts_per_token=int(_get(cfg, "num_experts_per_tok", "moe_top_k", default=2)),
                moe_intermediate_size=moe_inter,
                shared_expert_intermediate_size=int(shared),
                moe_layers=max(0, moe_layers),
            )
        mla = None
        if cfg.get("kv_lora_rank"):
            mla = {
                "kv_lora_rank": int(cfg["kv_lora_rank"]),
                "qk_rope_head_dim": int(cfg.get("qk_rope_head_dim") or 64),
                "qk_nope_head_dim": int(cfg.get("qk_nope_head_dim") or 128),
                "v_head_dim": int(cfg.get("v_head_dim") or 128),
                "q_lora_rank": int(cfg["q_lora_rank"]) if cfg.get("q_lora_rank") else None,
            }
        window, sliding = _sliding_layers(cfg, model_type, layers)
        quant = config.get("quantization_config") or cfg.get("quantization_config") or config.get("compression_config")
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=intermediate,
            vocab_size=vocab,
            tied_embeddings=bool(tied),
            gated_mlp=model_type not in _NON_GATED_MLP,
            qkv_bias=bool(cfg.get("attention_bias")) or model_type in _QKV_BIAS,
            max_position_embeddings=int(max_pos) if max_pos else None,
            checkpoint_dtype=str(dtype) if dtype else None,
            mla=mla,
            sliding_window=window,
            sliding_layers=sliding,
            quantization_config=quant if isinstance(quant, dict) else None,
            **moe,
        )

    # -- linear layers, as (in_features, out_features) -------------------------------------

    def attention_linears(self) -> list[tuple[int, int]]:
        h = self.hidden_size
        if self.mla:
            m = self.mla
            qk = m["qk_nope_head_dim"] + m["qk_rope_head_dim"]
            q = (
                [(h, m["q_lora_rank"]), (m["q_lora_rank"], self.num_heads * qk)]
                if m["q_lora_rank"]
                else [(h, self.num_heads * qk)]
            )
            return q + [
                (h, m["kv_lora_rank"] + m["qk_rope_head_dim"]),
                (m["kv_lora_rank"], self.num_heads * (m["qk_nope_head_dim"] + m["v_head_dim"])),
                (self.num_heads * m["v_head_dim"], h),
            ]
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return [(h, q_out), (h, kv_out), (h, kv_out), (q_out, h)]

    def mlp_linears(self, intermediate: int) -> list[tuple[int, int]]:
        h = self.hidden_size
        if self.gated_mlp:
            return [(h, intermediate), (h, intermediate), (intermediate, h)]
        return [(h, intermediate), (intermediate, h)]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.moe_layers if self.is_moe else self.num_layers

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part: embeddings, lm_head, attention, mlp, experts, router, norms."""
        h, n = self.hidden_size, self.num_layers
        attn = sum(i * o for i, o in self.attention_linears())
        if self.qkv_bias and not self.mla:
            attn += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        norms = 2 * h * n + h
        if self.mla:
            norms += n * (self.mla["kv_lora_rank"] + (self.mla["q_lora_rank"] or 0))
        counts = {
            "embeddings": self.vocab_size * h,
            "lm_head": 0 if self.tied_embeddings else self.vocab_size * h,
            "attention": attn * n,
            "mlp": self.dense_layers * sum(i * o for i, o in self.mlp_linears(self.intermediate_size)),
            "experts": 0,
            "shared_experts": 0,
            "router": 0,
            "norms": norms,
        }
        if self.is_moe:
            expert = sum(i * o for i, o in self.mlp_linears(self.moe_intermediate_size))
            counts["experts"] = self.moe_layers * self.num_experts * expert
            if self.shared_expert_intermediate_size:
                counts["shared_experts"] = self.moe_layers * sum(
                    i * o for i, o in self.mlp_linears(self.shared_expert_intermediate_size)
                )
            counts["router"] = self.moe_layers * h * self.num_experts
        return counts

    def lora_parameters(self, rank: int = LORA_RANK) -> int:
        """Trainable LoRA parameters with ``target_modules="all-linear"`` (the training recipe):
        every ``nn.Linear`` but the lm_head; routed experts are fused tensors in transformers 5, not
        ``nn.Linear``, so they get no adapter."""
        per_layer = sum(i + o for i, o in self.attention_linears())
        total = per_layer * self.num_layers
        total += self.dense_layers * sum(i + o for i, o in self.mlp_linears(self.intermediate_size))
        if self.is_moe:
            total += self.moe_layers * (self.hidden_size + self.num_experts)  # the router
            if self.shared_expert_intermediate_size:
                total += self.moe_layers * sum(i + o for i, o in self.mlp_linears(self.shared_expert_intermediate_size))
        return rank * total

    # -- KV cache ------------------------------------------------------------------------------

    def kv_elements_per_token_per_layer(self) -> int:
        """K and V elements one token stores in one layer (MLA stores one compressed latent)."""
        if self.mla:
            return self.mla["kv_lora_rank"] + self.mla["qk_rope_head_dim"]
        return 2 * self.num_kv_heads * self.head_dim

    def kv_cache_tokens(self, max_model_len: int) -> int:
        """Token-layers one sequence of ``max_model_len`` holds: sliding-window layers keep at most
        the window."""
        full = self.num_layers - self.sliding_layers
        window = min(max_model_len, self.sliding_window or max_model_len)
        return full * max_model_len + self.sliding_layers * window

    def default_max_model_len(self) -> int:
        return min(self.max_position_embeddings or MAX_MODEL_LEN_CAP, MAX_MODEL_LEN_CAP)

    def largest_layer_parameters(self) -> int:
        counts = self.parameter_counts()
        body = counts["attention"] + counts["mlp"] + counts["experts"] + counts["shared_experts"]
        return max(1, body // self.num_layers)


def _sliding_layers(cfg: Mapping, model_type: str, layers: int) -> tuple[int | None, int]:
    """(window, how many layers use it)."""
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or window <= 0:
        return None, 0
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        return window, sum(1 for kind in layer_types if "sliding" in str(kind))
    if "use_sliding_window" in cfg:  # Qwen2: off unless asked; then layers from max_window_layers on
        if not cfg.get("use_sliding_window"):
            return None, 0
        return window, max(0, layers - int(cfg.get("max_window_layers") or 0))
    pattern = cfg.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 1:  # Gemma 3: every pattern-th layer is global
        return window, layers - layers // pattern
    if model_type == "gemma2":  # alternating, starting with a sliding layer
        return window, (layers + 1) // 2
    return window, layers


def _dtype_bytes(name: str | None) -> int | None:
    return (
        {"float16": 2, "half": 2, "bfloat16": 2, "float32": 4, "float": 4, "float8_e4m3fn": 1, "float8": 1}.get(
            str(name).lower().replace("torch.", "")
        )
        if name
        else None
    )


@dataclass(frozen=True)
class Quantization:
    method: str
    bits: float
    group_size: int  # -1: per channel
    from_checkpoint: bool

    @property
    def bytes_per_param(self) -> float:
        """Bytes per quantized weight, with the scales (and zero points) of each group."""
        if self.method in _FP8_METHODS:
            return 1.0
        if self.method in _BNB_METHODS:
            return NF4_BYTES_PER_PARAM if self.bits <= 4 else 1.0
        if self.method in _MXFP4_METHODS:
            return 0.5 + 1 / 32  # 4-bit values, one 8-bit scale per 32
        group = self.group_size if self.group_size and self.group_size > 0 else None
        per_group = (2 + self.bits / 8) / group if group else 0.0  # fp16 scale + packed zero point
        return self.bits / 8 + per_group


def _quantization(arch: Architecture, requested: str | None) -> Quantization | None:
    qc = dict(arch.quantization_config or {})
    from_checkpoint = bool(qc)
    method = (requested or qc.get("quant_method") or qc.get("format") or "").lower().replace("-", "_")
    if not method:
        return None
    method = {"compressed_tensors": "compressed-tensors", "auto_round": "auto-round"}.get(method, method)
    if method not in QUANTIZATIONS:
        if requested:
            raise UserError(
                f"--quantization {requested!r}: unknown method; llm-atc plan knows {', '.join(QUANTIZATIONS)}"
            )
        return Quantization(method, 16, -1, from_checkpoint)  # sized from the index, if any
    bits = _get(qc, "bits", "w_bit", "weight_bits", "num_bits", default=None)
    group = _get(qc, "group_size", "q_group_size", default=128)
    if method == "compressed-tensors":
        for group_cfg in (qc.get("config_groups") or {}).values():
            weights = (group_cfg or {}).get("weights") or {}
            bits = weights.get("num_bits", bits)
            group = weights.get("group_size") or (-1 if weights.get("strategy") == "channel" else group)
            if weights.get("type") == "float" and bits == 8:
                method = "fp8"
            break
        bits = bits or 8
    if method in _FP8_METHODS:
        bits = 8
    if method in _BNB_METHODS:
        bits = 8 if qc.get("load_in_8bit") else 4
    return Quantization(method, float(bits or 4), int(group) if group else -1, from_checkpoint)


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
    checkpoint_bytes = _dtype_bytes(arch.checkpoint_dtype)
    quant = _quantization(arch, quantization) if mode == "serve" else None
    params, params_source = from_config, "config"
    if info.index_total_size and checkpoint_bytes and not arch.quantization_config:
        params, params_source = int(info.index_total_size / checkpoint_bytes), "safetensors index"
    other = max(0, params - linear)  # embeddings, lm_head, norms, router (and any vision tower)

    if dtype in ("float", "float32"):
        dtype_name, nbytes = "float32", 4
    elif dtype in ("half", "float16", "bfloat16"):
        dtype_name, nbytes = ("float16" if dtype == "half" else dtype), 2
    else:  # auto: the checkpoint's 16-bit dtype; vLLM casts float32 checkpoints to 16 bits
        dtype_name = arch.checkpoint_dtype if checkpoint_bytes == 2 else "bfloat16"
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
            formula = f"{_fmt_count(params)} params × {nbytes} B ({dtype_name})"
        elif arch.quantization_config and info.index_total_size and quant.from_checkpoint:
            weights = info.index_total_size
            formula = f"{quant.method} checkpoint: safetensors total_size {_fmt_bytes(weights)}"
        elif quant.bits >= 16:
            raise UserError(
                f"cannot size {info.name}'s {quant.method} weights without a safetensors index; "
                "pass a folder with model.safetensors.index.json"
            )
        else:
            weights = int(linear * quant.bytes_per_param + other * nbytes)
            formula = (
                f"{_fmt_count(linear)} linear params × {quant.bytes_per_param:.3f} B ({quant.method}, "
                f"{quant.bits:g}-bit, group {quant.group_size}) + {_fmt_count(other)} others × {nbytes} B"
            )
            if not quant.from_checkpoint and quant.method not in _FP8_METHODS | _BNB_METHODS:
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
            weight_formula=f"{_fmt_count(params)} params × 2 B (bfloat16)",
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
        formula = f"{_fmt_count(params)} frozen params × 2 B (bfloat16)"
    else:
        weights = int(linear * NF4_BYTES_PER_PARAM + other * 4)
        formula = (
            f"{_fmt_count(linear)} linear params × {NF4_BYTES_PER_PARAM:.3f} B (NF4, double quant) + "
            f"{_fmt_count(other)} others × 4 B (float32 after prepare_model_for_kbit_training)"
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


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# --------------------------------------------------------------------------------------------
# 4. Plans


@dataclass(frozen=True)
class Option:
    """An offer that fits: ``count`` GPUs per node on ``nodes`` nodes."""

    offer: Offer
    nodes: int
    need_bytes: int
    usable_bytes: int
    hourly: float  # for all nodes, spot or on-demand as asked
    region: str | None
    mode: str = "serve"

    @property
    def accelerator(self) -> str:
        return self.offer.accelerator

    @property
    def count(self) -> int:
        return self.offer.count

    @property
    def accelerators(self) -> str:
        """SkyPilot's ``NAME:COUNT`` (per node)."""
        return f"{self.offer.accelerator}:{self.offer.count}"

    def to_dict(self) -> dict[str, Any]:
        o = self.offer
        return {
            "accelerators": self.accelerators,
            "accelerator": o.accelerator,
            "count": o.count,
            "nodes": self.nodes,
            **(
                {"tensor_parallel": o.count, "pipeline_parallel": self.nodes}
                if self.mode == "serve"
                else {
                    "gpus": o.count * self.nodes,
                    "sharding": "fsdp"
                    if self.mode == "full" and o.count * self.nodes > 1
                    else ("ddp" if o.count * self.nodes > 1 else None),
                }
            ),
            "cloud": o.cloud,
            "instance_type": o.instance_type,
            "region": self.region,
            "gpu_memory_gib": o.gpu_memory_gib,
            "memory_source": o.memory_source,
            "need_per_gpu_gib": round(self.need_bytes / GIB, 2),
            "usable_per_gpu_gib": round(self.usable_bytes / GIB, 2),
            "hourly": round(self.hourly, 4),
            "price": o.price and round(o.price * self.nodes, 4),
            "price_region": o.price_region,
            "spot_price": o.spot_price and round(o.spot_price * self.nodes, 4),
            "spot_region": o.spot_region,
        }


@dataclass
class Plan:
    model: ModelInfo
    estimate: MemoryEstimate
    clouds: list[str]
    region: str | None
    use_spot: bool
    options: list[Option]  # the cheapest fitting offer per (GPU, cloud), cheapest first (single node first)
    infeasible: dict[str, str] = field(default_factory=dict)  # GPU -> why nothing fits

    @property
    def num_nodes(self) -> int | None:
        return self.options[0].nodes if self.options else None

    @property
    def auto(self) -> list[str]:
        """``--accelerator auto``: one ``NAME:COUNT`` per GPU type, cheapest first, all needing
        :attr:`num_nodes` nodes (SkyPilot's any_of cannot mix node counts)."""
        seen: dict[str, str] = {}
        for option in self.options:
            if option.nodes == self.num_nodes and option.accelerator not in seen:
                seen[option.accelerator] = option.accelerators
        return list(seen.values())

    @property
    def best(self) -> Option | None:
        return self.options[0] if self.options else None

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "model": self.model.name,
            "source": self.model.source,
            "adapter_of": self.model.adapter_of,
            "mode": e.mode,
            "architecture": {
                "model_type": e.arch.model_type,
                "layers": e.arch.num_layers,
                "hidden_size": e.arch.hidden_size,
                "attention_heads": e.arch.num_heads,
                "kv_heads": e.arch.num_kv_heads,
                "head_dim": e.arch.head_dim,
                "experts": e.arch.num_experts,
                "mla": bool(e.arch.mla),
                "sliding_window": e.arch.sliding_window if e.arch.sliding_layers else None,
                "max_position_embeddings": e.arch.max_position_embeddings,
            },
            "terms": e.terms(),
            "notes": list(e.notes),
            "clouds": self.clouds,
            "region": self.region,
            "use_spot": self.use_spot,
            "options": [option.to_dict() for option in self.options],
            "infeasible": [{"accelerator": name, "reason": reason} for name, reason in self.infeasible.items()],
            "auto": self.auto,
            "num_nodes": self.num_nodes,
        }


def _resolve_clouds(cloud: str | None, region: str | None) -> list[str]:
    if region and not cloud:
        raise UserError("--region needs --cloud to say which cloud the region is in")
    if cloud:
        from llm_atc.options import canonical_infra

        name = canonical_infra(cloud.strip().lower())
        if name in ("local",):
            raise UserError("--cloud local has no catalog; pass a cloud such as aws or gcp")
        return [name]
    clouds = catalog_clouds()
    if not clouds:
        raise UserError(
            f"no SkyPilot GPU catalog in {catalog_dir()}: run `sky gpus list` once online "
            "(it downloads the catalog), or pass --cloud"
        )
    return clouds


def plan_offers(
    estimate: MemoryEstimate, offers: list[Offer], *, use_spot: bool = False, max_nodes: int = MAX_NODES
) -> tuple[list[Option], dict[str, str]]:
    """The cheapest fitting option per (GPU, cloud), and why the other GPU types do not fit.

    Each offer is tried on one node; past one node only the largest count per node of that GPU
    on that cloud is stretched over more nodes, and only where more nodes lower the memory per
    GPU (serve: pipeline stages; full: FSDP), and only for nodes of 8 GPUs or more.
    """
    largest: dict[tuple[str, str], int] = {}
    for offer in offers:
        key = (offer.cloud, offer.accelerator)
        largest[key] = max(largest.get(key, 0), offer.count)
    best: dict[tuple[str, str], Option] = {}
    reasons: dict[str, tuple[int, str]] = {}  # GPU -> (count tried, reason) for the biggest count tried
    for offer in offers:
        price = offer.hourly(use_spot)
        if price is None:
            continue
        if offer.gpu_memory_gib is None:
            reasons.setdefault(offer.accelerator, (0, "its memory per GPU is unknown to SkyPilot's catalog"))
            continue
        stretch = (
            estimate.multi_node
            and offer.count >= MULTI_NODE_MIN_GPUS
            and offer.count == largest[(offer.cloud, offer.accelerator)]
        )
        for nodes in range(1, (max_nodes if stretch else 1) + 1):
            fit = estimate.fit(offer.gpu_memory_gib, offer.count, nodes)
            if fit.ok:
                option = Option(
                    offer, nodes, fit.need_bytes, fit.usable_bytes, price * nodes, offer.region(use_spot), estimate.mode
                )
                key = (offer.cloud, offer.accelerator)
                if key not in best or _rank(option) < _rank(best[key]):
                    best[key] = option
                break
            tried = offer.count * nodes
            if tried >= reasons.get(offer.accelerator, (-1, ""))[0]:
                where = f"{offer.count} x {round(offer.gpu_memory_gib, 1):g} GiB" + (
                    f" x {nodes} nodes" if nodes > 1 else ""
                )
                reasons[offer.accelerator] = (tried, f"{where}: {fit.reason}")
            if fit.reason and "tensor parallel" in fit.reason:
                break
    options = sorted(best.values(), key=_rank)
    fitted = {option.accelerator for option in options}
    infeasible = {name: why for name, (_, why) in sorted(reasons.items()) if name not in fitted}
    return options, infeasible


def _rank(option: Option) -> tuple:
    return (option.nodes, option.hourly, option.accelerator, option.offer.cloud)


def make_plan(
    model: str | ModelRef | ModelInfo | Mapping,
    *,
    mode: str = "serve",
    max_model_len: int | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    cloud: str | None = None,
    region: str | None = None,
    use_spot: bool = False,
    source: str | None = None,
    max_nodes: int = MAX_NODES,
    registry: Registry | None = None,
    train_envs: Mapping[str, str] | None = None,
    task: str | None = None,
) -> Plan:
    """Size ``model`` (served for ``task``: default what it says) and price every GPU type in SkyPilot's
    catalog that fits it."""
    info = load_model_info(model, source=source, registry=registry)
    estimate = estimate_memory(
        info,
        mode=mode,
        max_model_len=max_model_len,
        dtype=dtype,
        quantization=quantization,
        train_envs=train_envs,
        task=task,
    )
    clouds = _resolve_clouds(cloud, region)
    offers = list_offers(clouds, region)
    if region and not offers:
        raise UserError(f"SkyPilot's catalog lists no GPUs in region {region!r} of {', '.join(clouds)}")
    options, infeasible = plan_offers(estimate, offers, use_spot=use_spot, max_nodes=max_nodes)
    return Plan(info, estimate, clouds, region, use_spot, options, infeasible)


@dataclass(frozen=True)
class AutoChoice:
    """What ``--accelerator auto`` resolves to."""

    accelerators: tuple[str, ...]  # e.g. ("L4:1", "A10G:1", "A100:1"), cheapest first: render as any_of
    num_nodes: int
    max_model_len: int  # serve: the context the plan was sized for (pass it to the engine)
    plan: Plan

    @property
    def accelerator_text(self) -> str:
        """The comma list ``--accelerator`` already accepts (any of them)."""
        return ",".join(self.accelerators)


def auto_accelerators(
    model: str | ModelRef | ModelInfo | Mapping,
    *,
    mode: str = "serve",
    max_model_len: int | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    cloud: str | None = None,
    region: str | None = None,
    use_spot: bool = False,
    max_nodes: int = 1,
    source: str | None = None,
    registry: Registry | None = None,
    train_envs: Mapping[str, str] | None = None,
    task: str | None = None,
) -> AutoChoice:
    """The GPU types that fit, cheapest first, on the fewest nodes; raises a one-line
    :class:`UserError` when none does within ``max_nodes``."""
    plan = make_plan(
        model,
        mode=mode,
        max_model_len=max_model_len,
        dtype=dtype,
        quantization=quantization,
        cloud=cloud,
        region=region,
        use_spot=use_spot,
        source=source,
        max_nodes=max(max_nodes, 1),
        registry=registry,
        train_envs=train_envs,
        task=task,
    )
    if not plan.options:
        raise UserError(
            f"--accelerator auto: no GPU in SkyPilot's catalog ({', '.join(plan.clouds)}) fits "
            f"{plan.model.name} ({_summary(plan.estimate)}){_hint(plan.estimate)}"
        )
    return AutoChoice(tuple(plan.auto), plan.num_nodes or 1, plan.estimate.max_model_len, plan)


def _summary(e: MemoryEstimate) -> str:
    if e.mode == "serve" and not e.generates:
        return f"{_fmt_bytes(e.weight_bytes)} of weights + {_fmt_bytes(e.activation_bytes)} of activations ({e.task})"
    if e.mode == "serve":
        return (
            f"{_fmt_bytes(e.weight_bytes)} of weights + {_fmt_bytes(e.kv_cache_bytes)} of KV cache for "
            f"{e.max_model_len} tokens"
        )
    return f"{e.mode} fine-tune of {_fmt_count(e.params)} params"


def _hint(e: MemoryEstimate) -> str:
    if e.mode == "serve" and not e.quantization:
        return "; try --quantization fp8 or an AWQ checkpoint, or a smaller --max_model_len"
    if e.mode in ("full", "lora"):
        return "; try --mode qlora" if e.mode == "lora" else "; try --mode lora or --mode qlora"
    return ""


def iter_terms(e: MemoryEstimate) -> Iterator[tuple[str, str]]:
    """Human-readable lines of the formula, for the table view."""
    a = e.arch
    shape = f"{a.model_type or 'model'}, {a.num_layers} layers, {a.num_heads} heads / {a.num_kv_heads} KV heads"
    if a.is_moe:
        shape += f", {a.num_experts} experts ({a.experts_per_token} per token)"
    if a.mla:
        shape += ", MLA"
    yield "Shape", shape
    source = e.params_source
    if e.params_source != "config":
        source += f"; config says {_fmt_count(e.params_from_config)}"
    yield "Parameters", f"{_fmt_count(e.params)} ({source})"
    yield "Weights", f"{_fmt_bytes(e.weight_bytes)} = {e.weight_formula}"
    overhead = _fmt_bytes(e.overhead_bytes_per_gpu)
    if e.mode == "serve" and not e.generates:
        yield "Task", f"{e.task}: a pooling model, no KV cache"
        yield (
            "Activations",
            f"{_fmt_bytes(e.activation_bytes)} for one batch of {e.batch_size} tokens (vLLM's "
            f"max_num_batched_tokens; context {e.max_model_len})",
        )
        yield "Runtime", f"{overhead} per GPU (CUDA context, CUDA graphs)"
        yield "Fits if", f"weights / GPUs + activations + runtime <= {e.memory_fraction:g} x GPU memory"
    elif e.mode == "serve":
        yield (
            "KV cache",
            (
                f"{e.kv_bytes_per_token / 1024:.0f} KiB/token = {e.kv_formula()}; "
                f"{e.max_model_len} tokens (max_model_len) = {_fmt_bytes(e.kv_cache_bytes)}"
            ),
        )
        yield "Runtime", f"{overhead} per GPU (CUDA context, activations, CUDA graphs)"
        yield (
            "Fits if",
            (
                f"weights / GPUs + KV cache / stages + runtime <= {e.memory_fraction:g} x GPU memory "
                "(gpu_memory_utilization); tensor parallel = GPUs per node, pipeline = nodes"
            ),
        )
    else:
        yield "Trainable", f"{_fmt_count(e.trainable_params)} params; {e.state_formula}"
        yield (
            "Activations",
            (
                f"{_fmt_bytes(e.activation_bytes)} per GPU (batch {e.batch_size} x "
                f"{e.max_model_len} tokens, gradient checkpointing, float32 logits)"
            ),
        )
        yield "Runtime", f"{overhead} per GPU"
        yield "Fits if", f"weights + state + activations + runtime <= {e.memory_fraction:g} x GPU memory"
