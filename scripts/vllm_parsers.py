"""Write vLLM's tool-call and reasoning parsers, with the model families that use them, as JSON.

Run with the engine's own Python (the managed environment has it):
    ~/.llm_atc/engines/vllm/bin/python scripts/vllm_parsers.py > llm_atc/data/vllm-parsers.json

The family table below is kept by hand from vLLM's documentation of the pinned release (features/tool_calling,
features/reasoning_outputs) and vllm-project/recipes (models/<org>/<model>.yaml). This script checks it
against the vLLM it runs in before writing anything:
- every parser a family names is registered;
- each parser's start-up check (vLLM builds every parser with the model's tokenizer when the server starts)
  passes with a plain tokenizer, or fails without the tokens declared in TOKENS and passes with them.
llm-atc refuses a parser whose declared tokens the model's tokenizer lacks, before anything launches.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

DOCS = "https://docs.vllm.ai/en/v{version}/features/"
TOOLS_DOC = DOCS + "tool_calling/"
REASONING_DOC = DOCS + "reasoning_outputs/"
RECIPES = "https://github.com/vllm-project/recipes/blob/main/models/"

# The first entry that matches a model wins, so entries that a name singles out come before the entry of
# their architecture. An entry matches when every key it has matches: model_types (config.json's
# model_type), architectures (its first architectures entry), config (dotted keys and values), name (a
# regular expression searched case-insensitively in the model's names: --name, the Hub id, the base model).
# guess: where no config.json can be read (the Hub out of reach), a name that alone picks the entry.
# chat_template: a template vLLM's documentation recommends beyond the model's own (from vLLM's repository),
# shown as a note.
FAMILIES = [
    {
        "family": "DeepSeek-R1 distills",
        "name": r"DeepSeek-R1-Distill",
        "reasoning_parser": "deepseek_r1",
        "source": REASONING_DOC,
    },
    {
        "family": "QwQ",
        "name": r"QwQ",
        "model_types": ["qwen2"],
        "tool_parser": "hermes",
        "reasoning_parser": "deepseek_r1",
        "source": REASONING_DOC,
    },
    {
        "family": "Hermes 2 Pro / 2 Theta / 3 / 4",
        "name": r"Hermes-(2-Pro|2-Theta|3|4)",
        "tool_parser": "hermes",
        "source": TOOLS_DOC,
    },
    {
        "family": "xLAM",
        "name": r"xLAM",
        "tool_parser": "xlam",
        "source": TOOLS_DOC,
        "chat_template": "examples/tool_chat_template_xlam_llama.jinja (Llama) or "
        "examples/tool_chat_template_xlam_qwen.jinja (Qwen)",
    },
    {
        "family": "Qwen3-Coder",
        "name": r"Qwen3-Coder",
        "tool_parser": "qwen3_coder",
        "source": RECIPES + "Qwen/Qwen3-Coder-480B-A35B-Instruct.yaml",
    },
    {
        "family": "Qwen3 Instruct (non-thinking)",
        "name": r"Qwen3[\w.-]*-Instruct",
        "model_types": ["qwen3", "qwen3_moe", "qwen3_next"],
        "tool_parser": "hermes",
        "source": RECIPES + "Qwen/Qwen3-235B-A22B-Instruct-2507.yaml",
    },
    {
        "family": "Qwen3",
        "guess": r"Qwen3-\d",
        "model_types": ["qwen3", "qwen3_moe", "qwen3_next"],
        "tool_parser": "hermes",
        "reasoning_parser": "qwen3",
        "source": RECIPES + "Qwen/Qwen3-8B.yaml",
    },
    {
        "family": "Qwen3.5",
        "guess": r"Qwen3\.[5-9]-",
        "model_types": ["qwen3_5", "qwen3_5_moe"],
        "tool_parser": "qwen3_coder",
        "reasoning_parser": "qwen3",
        "source": RECIPES + "Qwen/Qwen3.5-27B.yaml",
    },
    {
        "family": "Qwen2.5",
        "guess": r"Qwen2\.5-[\w.-]*Instruct",
        "model_types": ["qwen2", "qwen2_moe"],
        "tool_parser": "hermes",
        "source": TOOLS_DOC,
    },
    {
        "family": "DeepSeek-R1",
        "name": r"DeepSeek-R1",
        "model_types": ["deepseek_v3"],
        "tool_parser": "deepseek_v3",
        "reasoning_parser": "deepseek_r1",
        "source": TOOLS_DOC,
        "chat_template": "examples/tool_chat_template_deepseekr1.jinja",
    },
    {
        "family": "DeepSeek-V3.1",
        "name": r"DeepSeek-V3\.1",
        "model_types": ["deepseek_v3"],
        "tool_parser": "deepseek_v31",
        "reasoning_parser": "deepseek_v3",
        "source": TOOLS_DOC,
        "chat_template": "examples/tool_chat_template_deepseekv31.jinja",
    },
    {
        "family": "DeepSeek-V3",
        "guess": r"DeepSeek-V3",
        "model_types": ["deepseek_v3"],
        "tool_parser": "deepseek_v3",
        "source": TOOLS_DOC,
        "chat_template": "examples/tool_chat_template_deepseekv3.jinja",
    },
    {
        "family": "Kimi K2 Thinking",
        "name": r"Thinking",
        "model_types": ["kimi_k2"],
        "tool_parser": "kimi_k2",
        "reasoning_parser": "kimi_k2",
        "source": RECIPES + "moonshotai/Kimi-K2-Thinking.yaml",
    },
    {
        "family": "Kimi K2",
        "guess": r"Kimi-K2-Instruct",
        "model_types": ["kimi_k2"],
        "tool_parser": "kimi_k2",
        "source": TOOLS_DOC,
    },
    {
        "family": "Kimi K2.5",
        "model_types": ["kimi_k25"],
        "tool_parser": "kimi_k2",
        "reasoning_parser": "kimi_k2",
        "source": RECIPES + "moonshotai/Kimi-K2.5.yaml",
    },
    {
        "family": "gpt-oss",
        "guess": r"gpt-oss",
        "model_types": ["gpt_oss"],
        "tool_parser": "openai",
        "reasoning_parser": "openai_gptoss",
        "source": RECIPES + "openai/gpt-oss-20b.yaml",
    },
    {
        "family": "GLM-4.5 and later",
        "guess": r"GLM-(4\.[5-9]|5)",
        "model_types": ["glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa"],
        "tool_parser": "glm47",
        "reasoning_parser": "glm45",
        "source": RECIPES + "zai-org/GLM-4.7.yaml",
    },
    {
        "family": "MiniMax-M2",
        "guess": r"MiniMax-M2",
        "model_types": ["minimax_m2"],
        "tool_parser": "minimax_m2",
        "reasoning_parser": "minimax_m2",
        "source": RECIPES + "MiniMaxAI/MiniMax-M2.yaml",
    },
    {
        "family": "Seed-OSS",
        "model_types": ["seed_oss"],
        "tool_parser": "seed_oss",
        "reasoning_parser": "seed_oss",
        "source": RECIPES + "ByteDance-Seed/Seed-OSS-36B-Instruct.yaml",
    },
    {
        "family": "ERNIE-4.5 Thinking",
        "name": r"Thinking",
        "model_types": ["ernie4_5_moe"],
        "tool_parser": "ernie45",
        "reasoning_parser": "ernie45",
        "source": REASONING_DOC,
    },
    {
        "family": "Llama 3.1 / 3.2 / 3.3",
        "guess": r"Llama-3\.[123]-[\w.-]*Instruct",
        "model_types": ["llama"],
        "config": {"rope_scaling.rope_type": "llama3"},
        "tool_parser": "llama3_json",
        "source": TOOLS_DOC,
        "chat_template": "examples/tool_chat_template_llama3.1_json.jinja",
    },
    {
        "family": "Llama 4",
        "guess": r"Llama-4-",
        "model_types": ["llama4"],
        "tool_parser": "llama4_pythonic",
        "source": TOOLS_DOC,
        "chat_template": "examples/tool_chat_template_llama4_pythonic.jinja",
    },
    {
        "family": "Magistral and Mistral reasoning models",
        "name": r"Magistral|Reasoning",
        "model_types": ["mistral", "mistral3"],
        "tool_parser": "mistral",
        "reasoning_parser": "mistral",
        "source": RECIPES + "mistralai/Ministral-3-8B-Reasoning-2512.yaml",
    },
    {
        "family": "Mistral (function-calling releases)",
        # Mistral 7B v0.1/v0.2 share the architecture but not the [TOOL_CALLS] token: the name decides.
        "name": r"Instruct-v0\.3|Mistral-(Small|Medium|Large|Nemo)|Ministral|Devstral|Codestral|Pixtral",
        "model_types": ["mistral", "mistral3"],
        "tool_parser": "mistral",
        "source": TOOLS_DOC,
    },
    {
        "family": "Granite 4",
        "guess": r"granite-4\.",
        "model_types": ["granitemoehybrid"],
        "tool_parser": "granite4",
        "source": TOOLS_DOC,
    },
    {
        "family": "Granite 3",
        "guess": r"granite-3\.",
        "model_types": ["granite", "granitemoe"],
        "tool_parser": "granite",
        "source": TOOLS_DOC,
    },
    {
        "family": "InternLM2",
        "model_types": ["internlm2"],
        "tool_parser": "internlm",
        "source": TOOLS_DOC,
        "chat_template": "examples/tool_chat_template_internlm2_tool.jinja",
    },
    {"family": "Jamba", "model_types": ["jamba"], "tool_parser": "jamba", "source": TOOLS_DOC},
    {
        "family": "Phi-4-mini",
        "name": r"Phi-4-mini",
        "model_types": ["phi3"],
        "tool_parser": "phi4_mini_json",
        "source": TOOLS_DOC,
        "chat_template": "examples/tool_chat_template_phi4_mini.jinja",
    },
    {
        "family": "Gemma 4",
        "guess": r"gemma-4-",
        "model_types": ["gemma4"],
        "tool_parser": "gemma4",
        "reasoning_parser": "gemma4",
        "source": RECIPES + "google/gemma-4-31B-it.yaml",
        "chat_template": "examples/tool_chat_template_gemma4.jinja",
    },
    {
        "family": "Hunyuan-A13B",
        "model_types": ["hunyuan_v1_moe"],
        "tool_parser": "hunyuan_a13b",
        "reasoning_parser": "hunyuan_a13b",
        "source": TOOLS_DOC,
    },
    {"family": "Olmo 3", "model_types": ["olmo3"], "tool_parser": "olmo3", "source": TOOLS_DOC},
    {"family": "LongCat-Flash", "model_types": ["longcat_flash"], "tool_parser": "longcat", "source": TOOLS_DOC},
    {
        "family": "Step-3.5",
        "model_types": ["step3p5"],
        "tool_parser": "step3p5",
        "reasoning_parser": "step3p5",
        "source": RECIPES + "stepfun-ai/Step-3.5-Flash.yaml",
    },
    {
        "family": "MiMo-V2-Flash",
        "model_types": ["mimo_v2_flash"],
        "tool_parser": "qwen3_xml",
        "reasoning_parser": "qwen3",
        "source": RECIPES + "XiaomiMiMo/MiMo-V2-Flash.yaml",
    },
    {
        "family": "LFM2 Thinking",
        "name": r"Thinking",
        "model_types": ["lfm2", "lfm2_moe"],
        "tool_parser": "lfm2",
        "reasoning_parser": "qwen3",
        "source": RECIPES + "LiquidAI/LFM2.5-1.2B-Thinking.yaml",
    },
    {
        "family": "LFM2",
        "model_types": ["lfm2", "lfm2_moe"],
        "tool_parser": "lfm2",
        "source": RECIPES + "LiquidAI/LFM2.5-1.2B-Instruct.yaml",
    },
    {
        "family": "Nemotron 3",
        "name": r"Nemotron-3",
        "model_types": ["nemotron_h"],
        "tool_parser": "qwen3_coder",
        "reasoning_parser": "nemotron_v3",
        "source": RECIPES + "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.yaml",
    },
    {
        "family": "Apertus",
        "model_types": ["apertus"],
        "tool_parser": "apertus",
        "source": TOOLS_DOC,
        "chat_template": "examples/tool_chat_template_apertus.jinja",
    },
]

# Tokens a parser looks up in the tokenizer's vocabulary when vLLM starts; it refuses to start without them.
TOKENS = {
    "tool": {
        "llama3_json": ["<|python_tag|>"],
        "llama4_json": ["<|python_tag|>"],
        "mistral": ["[TOOL_CALLS]"],
        "deepseek_v3": ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"],
        "deepseek_v31": ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"],
        "jamba": ["<tool_calls>", "</tool_calls>"],
        "lfm2": ["<|tool_call_start|>", "<|tool_call_end|>"],
    },
    "reasoning": {
        "deepseek_r1": ["<think>", "</think>"],
        "holo2": ["<think>", "</think>"],
        "ernie45": ["<think>", "</think>"],
        "step3": ["</think>"],
        "minimax_m3": ["<mm:think>", "</mm:think>"],
        "mistral": ["[TOOL_CALLS]"],
    },
}


def _tokenizer(extra: list[str]):
    """A small byte-level BPE tokenizer, with ``extra`` added as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(300)]
    base = Tokenizer(models.BPE(unk_token=None))
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        show_progress=False,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    base.train_from_iterator(text, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


def _starts(kind: str, name: str, tokens: list[str]) -> bool:
    """Whether vLLM's start-up check accepts parser ``name`` with a tokenizer that has ``tokens``."""
    from vllm.parser.parser_manager import ParserManager

    options = (
        {"tool_parser_name": name, "enable_auto_tools": True} if kind == "tool" else {"reasoning_parser_name": name}
    )
    try:
        ParserManager.get_parser(tokenizer=_tokenizer(tokens), model_name="llm-atc-check", **options)
    except Exception:
        return False
    return True


def build() -> dict:
    import vllm
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    registered = {"tool": ToolParserManager.list_registered(), "reasoning": ReasoningParserManager.list_registered()}
    problems = []
    used = {kind: sorted({f[f"{kind}_parser"] for f in FAMILIES if f.get(f"{kind}_parser")}) for kind in registered}
    for kind, names in used.items():
        for name in sorted({*names, *TOKENS[kind]}):
            if name not in registered[kind]:
                problems.append(f"{kind} parser {name} is not registered in vLLM {vllm.__version__}")
                continue
            tokens = TOKENS[kind].get(name, [])
            if tokens and _starts(kind, name, []):
                problems.append(f"{kind} parser {name} starts without {tokens}: drop them from TOKENS")
            if not _starts(kind, name, tokens):
                problems.append(f"{kind} parser {name} does not start with the tokens {tokens}: declare what it needs")
    if problems:
        sys.exit("\n".join(problems))
    version = vllm.__version__
    families = [{k: v.format(version=version) if k == "source" else v for k, v in f.items()} for f in FAMILIES]
    return {
        "vllm": version,
        "tool_parsers": registered["tool"],
        "reasoning_parsers": registered["reasoning"],
        "tool_tokens": TOKENS["tool"],
        "reasoning_tokens": TOKENS["reasoning"],
        "families": families,
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)
    json.dump(build(), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
