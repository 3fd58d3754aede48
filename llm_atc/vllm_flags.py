"""``--vllm_args``, checked against the flags of the vLLM llm-atc pins before anything launches.

The flag list is data (``data/vllm-flags.json``, written by ``scripts/vllm_flags.py`` from
vLLM's own argument parser), so a typo is caught here and not after a GPU node has booted.
Flags that llm-atc sets from its own options are refused with the option to use instead.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from importlib import resources

from llm_atc.errors import UserError

DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")  # what vLLM's --dtype accepts

# Quantization methods, by how vLLM stores their weights.
INT_METHODS = frozenset(
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
FP8_METHODS = frozenset({"fp8", "fbgemm_fp8", "ptpc_fp8", "modelopt", "fp8_e4m3"})
BNB_METHODS = frozenset({"bitsandbytes", "bnb"})
MXFP4_METHODS = frozenset({"mxfp4"})
QUANTIZATIONS = tuple(sorted(INT_METHODS | FP8_METHODS | BNB_METHODS | MXFP4_METHODS | {"compressed-tensors"}))

# vLLM's flags (by argparse dest) that llm-atc sets or must know, and what to say instead.
_USE = "is set by llm-atc; use llm-atc's"
OWNED = {
    "model": f"{_USE} --name",
    "served_model_name": f"{_USE} --name (clients send it as `model`)",
    "port": f"{_USE} --port",
    "host": "is set by llm-atc: 127.0.0.1 locally, every interface on a node (reach a private node with "
    "`llm-atc endpoint NAME --forward`)",
    "api_key": f"{_USE} --secret VLLM_API_KEY=KEY (or --no_auth); by default each deployment gets its own key",
    "hf_token": f"{_USE} --secret HF_TOKEN (a flag would write the token into the task)",
    "tensor_parallel_size": f"{_USE} --accelerator (vLLM uses every GPU of the node)",
    "pipeline_parallel_size": f"{_USE} --num_nodes",
    "lora_modules": f"{_USE} --lora NAME=REF",
    "enable_lora": f"{_USE} --max_loras (runtime LoRA is on by default; --lora adds adapters at start)",
    "max_loras": f"{_USE} --max_loras",
    "max_lora_rank": f"{_USE} --max_lora_rank",
    "max_model_len": f"{_USE} --max_model_len",
    "dtype": f"{_USE} --dtype",
    "quantization": f"{_USE} --quantization",
    "chat_template": f"{_USE} --chat_template",
    "config": "could set flags that llm-atc owns; pass the flags themselves",
    "uds": f"{_USE} --port (llm-atc serves over TCP)",
    "ssl_certfile": f"{_USE} --tls_cert (with --tls_key)",
    "ssl_keyfile": f"{_USE} --tls_key (with --tls_cert)",
    "load_format": f"{_USE} --weights (stream: from the bucket with Run:ai's streamer; copy: from disk)",
    "help": "would print vLLM's help and exit instead of serving",
    "runner": f"{_USE} --task (embed, rerank and classify run vLLM's pooling runner)",
    "convert": f"{_USE} --task (a generative model serves embeddings with --task embed)",
    "enable_auto_tool_choice": f"{_USE} --tool_parser (on by default for model families vLLM documents)",
    "tool_call_parser": f"{_USE} --tool_parser",
    "reasoning_parser": f"{_USE} --reasoning_parser",
}
# ... and those it sets when several models share a node (serve --name A --name B).
OWNED_WHEN_SEVERAL = {
    "gpu_memory_utilization": "is set by llm-atc for each engine when several models share a node "
    "(their shares of GPU memory, from each model's size)",
}


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(resources.files("llm_atc").joinpath("data/vllm-flags.json").read_text())


def pinned_flags() -> tuple[str, dict[str, dict]]:
    """(vLLM version, {flag: {"dest": ..., "value": none|one|many|optional}}): the flags that both vLLM's CUDA
    and CPU builds accept, with the same meaning (``--vllm_args`` goes to whichever build a node installs)."""
    return _data()["vllm"], _data()["flags"]


def _normalise(token: str) -> str:
    """The flag a token names, as vLLM's parser sees it: ``--max_model_len=8`` -> ``--max-model-len``,
    ``--compilation-config.mode`` -> ``--compilation-config``, ``-O3`` -> ``--optimization-level``."""
    name = token.split("=", 1)[0]
    if name.startswith("-O") and not name.startswith("--"):
        return "--optimization-level"
    if name.startswith("--"):
        return "--" + name[2:].split(".", 1)[0].replace("_", "-")
    return name


def _resolve(name: str, flags: dict[str, dict], option: str) -> str:
    """``name`` as one of ``flags`` (argparse accepts unambiguous prefixes of long flags)."""
    if name in flags:
        return name
    for build in ("cpu", "cuda"):
        if name in _data()[f"{build}_only"]:
            raise UserError(
                f"{option} {name} exists only in vLLM {_data()['vllm']}'s {build.upper()} build; llm-atc passes "
                "the flags both builds accept (a node installs either)"
            )
    prefixed = sorted(f for f in flags if name.startswith("--") and f.startswith(name))
    if len(prefixed) == 1:
        return prefixed[0]
    version = pinned_flags()[0]
    if prefixed:
        raise UserError(f"{option} {name} is ambiguous in vLLM {version}: {', '.join(prefixed[:4])}, ...")
    close = difflib.get_close_matches(name, list(flags), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UserError(f"{option} {name}: vLLM {version} has no such flag{hint}")


def check_vllm_args(args: tuple[str, ...], *, option: str = "--vllm_args", several: bool = False) -> tuple[str, ...]:
    """``args`` unchanged when every flag is one vLLM knows and llm-atc does not own; else UserError.
    ``several``: the flags go to each engine of a node serving several models."""
    flags = pinned_flags()[1]
    owned_flags = {**OWNED, **OWNED_WHEN_SEVERAL} if several else OWNED
    index = 0
    while index < len(args):
        token = args[index]
        if not token.startswith("-") or token == "-":
            raise UserError(f"{option}: {token!r} is not a flag (the model is llm-atc's --name)")
        flag = _resolve(_normalise(token), flags, option)
        owned = owned_flags.get(flags[flag]["dest"])
        if owned:
            raise UserError(f"{option} {token.split('=', 1)[0]} {owned}")
        index += 1
        takes = flags[flag]["value"]
        if "=" in token or takes == "none" or token.startswith("-O") and token not in ("-O", "--optimization-level"):
            continue
        if takes == "one":
            if index >= len(args):
                raise UserError(f"{option} {token} needs a value")
            index += 1
        else:  # many (at least one) or optional: the values run to the next flag
            start = index
            while index < len(args) and not args[index].startswith("-"):
                index += 1
            if takes == "many" and index == start:
                raise UserError(f"{option} {token} needs a value")
    return args
