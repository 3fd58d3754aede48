"""Write what vLLM's CPU build can run, as JSON: the attention head sizes its CPU kernels have.

Run with the engine's own Python (the managed environment, CPU build):
    ~/.llm_atc/engines/vllm/bin/python scripts/vllm_cpu.py > llm_atc/data/vllm-cpu.json

vLLM 0.32's CPU build starts a model of another head size and fails at its first request ("Unsupported CPU
attention configuration"); `serve --engine auto` reads this list to pick transformers serve for such a model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    logging.disable(logging.CRITICAL)
    import vllm
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = sorted(CPUAttentionBackend.get_supported_head_sizes())
    json.dump({"vllm": vllm.__version__, "attention_head_sizes": sizes}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
