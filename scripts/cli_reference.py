"""Generate docs/cli.md from the Click commands: `python scripts/cli_reference.py [--check]`.

With --check, exit 1 when docs/cli.md is out of date (the test suite runs this).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from llm_atc.cli import COMMANDS, cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def preamble() -> str:
    """Exit codes, the ranges numbers are checked against, shell completion."""
    from llm_atc import config_file
    from llm_atc.options import LIMITS, SECRET_RULE, plain_number

    config_doc = (
        config_file.__doc__.strip()
        .replace("\n\n    ", "\n\n```yaml\n", 1)
        .replace("\n\nEach key", "\n```\n\nEach key", 1)
    )
    config_doc = "\n".join(line[4:] if line.startswith("    ") else line for line in config_doc.splitlines())

    limits = "\n".join(
        f"| `{option}` | {plain_number(low)} to {plain_number(high)} {unit} |"
        for option, (low, high, unit) in LIMITS.items()
        if option.startswith("--")
    )
    return f"""## Exit codes

| code | meaning |
| --- | --- |
| 0 | done |
| 1 | it was launched and then failed (the engine died, the job failed), or SkyPilot could not launch it |
| 2 | bad input, or a state that refuses it (one `Error:` line naming the option); also Click's usage errors |
| 3 | not found: a deployment, run, cluster, bucket, object or file that does not exist |
| 4 | not confirmed: you said no, or there was no terminal to ask and no `-y` |
| 128+N | interrupted by signal N: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP |

## Numbers

Every number is checked before anything launches; `--accelerator` counts are at most 64 GPUs per node.

| option | range |
| --- | --- |
{limits}

## Secrets

`--secret KEY[=VALUE]` always travels as a SkyPilot secret; so do, given with `--envs`, {SECRET_RULE}.

## Defaults: $LLM_ATC_HOME/config.yaml

{config_doc}

## Shell completion

```bash
eval "$(_LLM_ATC_COMPLETE=bash_source llm-atc)"    # in ~/.bashrc; zsh: zsh_source, fish: fish_source
```
"""


def render() -> str:
    parts = [
        "# CLI reference\n",
        "Generated from the Click commands by `python scripts/cli_reference.py`; do not edit by hand.\n",
        preamble(),
    ]
    root = click.Context(cli, info_name="llm-atc", terminal_width=100, max_content_width=100, **cli.context_settings)
    parts.append(f"## llm-atc\n\n```text\n{cli.get_help(root)}\n```\n")
    for name in COMMANDS:
        command = cli.get_command(root, name)
        ctx = click.Context(command, info_name=name, parent=root, terminal_width=100, max_content_width=100)
        parts.append(f"## llm-atc {name}\n\n```text\n{command.get_help(ctx)}\n```\n")
        for sub_name in command.list_commands(ctx) if isinstance(command, click.Group) else ():
            sub = command.get_command(ctx, sub_name)
            sub_ctx = click.Context(sub, info_name=sub_name, parent=ctx, terminal_width=100, max_content_width=100)
            parts.append(f"### llm-atc {name} {sub_name}\n\n```text\n{sub.get_help(sub_ctx)}\n```\n")
    return "\n".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
