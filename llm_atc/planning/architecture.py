"""The model's shape, read from its config: layers, heads, experts, attention windows, quantization."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_atc.errors import UserError
from llm_atc.vllm_flags import BNB_METHODS, FP8_METHODS, MXFP4_METHODS, QUANTIZATIONS

# Without --max_model_len, serving is sized for the model's context, at most this.
MAX_MODEL_LEN_CAP = 32768

# The training recipe's defaults (recipes/train/finetune.py: MAX_SEQ_LEN, BATCH_SIZE, LORA_R).
# Training's sequence length, batch size and LoRA rank are the recipes' (recipes_catalog.train_settings).
LORA_RANK = 16  # peft's default, for LoRA parameters outside a training plan

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

# bitsandbytes NF4 with double quantization: 4 bits plus an 8-bit absmax per 64 weights.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64


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


def dtype_bytes(name: str | None) -> int | None:
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
        if self.method in FP8_METHODS:
            return 1.0
        if self.method in BNB_METHODS:
            return NF4_BYTES_PER_PARAM if self.bits <= 4 else 1.0
        if self.method in MXFP4_METHODS:
            return 0.5 + 1 / 32  # 4-bit values, one 8-bit scale per 32
        group = self.group_size if self.group_size and self.group_size > 0 else None
        per_group = (2 + self.bits / 8) / group if group else 0.0  # fp16 scale + packed zero point
        return self.bits / 8 + per_group


def quantization_of(arch: Architecture, requested: str | None) -> Quantization | None:
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
    if method in FP8_METHODS:
        bits = 8
    if method in BNB_METHODS:
        bits = 8 if qc.get("load_in_8bit") else 4
    return Quantization(method, float(bits or 4), int(group) if group else -1, from_checkpoint)
