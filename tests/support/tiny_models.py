"""Tiny chat models of the families llm-atc maps to vLLM's parsers, built offline in seconds: the demo
model's tokenizer and a 2-layer Qwen2/Qwen3 of head size 64 (vLLM's CPU kernels), a Hermes-style chat
template that renders tools, and the tokens a parser needs when asked for."""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2.5's format in a few lines of our own: tools in the system turn, calls as <tool_call>{json}</tool_call>.
HERMES_TEMPLATE = (
    '{%- if tools %}<|im_start|>system\nCall a tool with <tool_call>{"name": ..., "arguments": ...}</tool_call>.\n'
    "<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% for call in message.tool_calls %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]
THINK_TOKENS = ["<think>", "</think>"]


def build_family_model(path: Path, *, model_type: str = "qwen2", tokens: list[str] = TOOL_TOKENS) -> Path:
    """A tiny Qwen2 (``qwen2``) or Qwen3 (``qwen3``) chat model with ``tokens`` added to its tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from llm_atc.demo import _build_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    if tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.chat_template = HERMES_TEMPLATE
    config_class, model_class = (
        (Qwen3Config, Qwen3ForCausalLM) if model_type == "qwen3" else (Qwen2Config, Qwen2ForCausalLM)
    )
    config = config_class(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = model_class(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["model_type"] == model_type
    return path


def build_head16_model(path: Path) -> Path:
    """The tiny Llama of shared/NOTES.md: hidden size 64 in 4 heads of 16, which vLLM's CPU kernels lack
    (transformers runs it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_atc.demo import _build_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
