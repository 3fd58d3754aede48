"""Rendered tasks, as the tests read them: SkyPilot's own parser, `serve --dryrun`, and the engine commands."""

from __future__ import annotations

import argparse
import copy
import shlex

import yaml


def sky_task(config: dict):
    """SkyPilot's own parser and validator (it consumes the dict, so it gets a copy)."""
    from llm_atc.sky_sdk import import_sky

    return import_sky().Task.from_yaml_config(copy.deepcopy(config))


def dryrun(cli, *args):
    """``serve ARGS --dryrun``: (the task config, the CLI result); it must succeed, and each vLLM engine
    command it renders must parse with the flag list in use."""
    result = cli("serve", *args, "--dryrun")
    assert result.exit_code == 0, result
    config = yaml.safe_load(result.stdout)
    if "VLLM_COMMAND" in config.get("envs", {}):
        for command in engines_of(config):
            parse_engine_command(command)
    return config, result


def parse_engine_command(command: list[str]) -> argparse.Namespace:
    """A rendered vLLM command's arguments, parsed by an argparse parser made of the shipped flag list (the
    flags both vLLM builds accept, with the values each takes): an unknown flag, a leftover word or a missing
    value fails, as it would on the node."""
    from llm_atc.vllm_flags import pinned_flags

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    names: dict[tuple[str, str], list[str]] = {}
    for name, meaning in pinned_flags()[1].items():
        names.setdefault((meaning["dest"], meaning["value"]), []).append(name)
    takes = {"none": {"action": "store_true"}, "one": {}, "many": {"nargs": "+"}, "optional": {"nargs": "?"}}
    for (dest, value), options in names.items():
        parser.add_argument(*options, dest=dest, **takes[value])
    server = command.index("vllm.entrypoints.openai.api_server")
    parsed, unknown = parser.parse_known_args(command[server + 1 :])
    assert not unknown, f"{unknown} in {shlex.join(command)}"
    return parsed


def command_of(config: dict) -> list[str]:
    """The exact vLLM command line the node runs (the recipe splits VLLM_COMMAND without a shell)."""
    return shlex.split(config["envs"]["VLLM_COMMAND"])


def engines_of(config: dict) -> list[list[str]]:
    """Every engine's command line of a deployment of several models (one per line of VLLM_COMMAND)."""
    return [shlex.split(line) for line in config["envs"]["VLLM_COMMAND"].splitlines()]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]
