"""Write the flags of vLLM's OpenAI server (the version llm-atc pins) as JSON, for checking --vllm_args.

Run with the engine's own Python (the managed environment has it):
    ~/.llm_atc/engines/vllm/bin/python scripts/vllm_flags.py > llm_atc/data/vllm-flags.json
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
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
    rows = ",\n".join(f"  {json.dumps(name)}: {json.dumps(flags[name])}" for name in sorted(flags))
    sys.stdout.write(f'{{"vllm": {json.dumps(vllm.__version__)}, "flags": {{\n{rows}\n}}}}\n')


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    main()
