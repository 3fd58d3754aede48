"""Rendered tasks, as the tests read them: SkyPilot's own parser, `serve --dryrun`, and the engine commands."""

from __future__ import annotations

import copy
import shlex

import yaml


def sky_task(config: dict):
    """SkyPilot's own parser and validator (it consumes the dict, so it gets a copy)."""
    from llm_atc.backends.skypilot import import_sky

    return import_sky().Task.from_yaml_config(copy.deepcopy(config))


def dryrun(cli, *args):
    """``serve ARGS --dryrun``: (the task config, the CLI result); it must succeed."""
    result = cli("serve", *args, "--dryrun")
    assert result.exit_code == 0, result
    return yaml.safe_load(result.stdout), result


def command_of(config: dict) -> list[str]:
    """The exact vLLM command line the node runs (the recipe splits VLLM_COMMAND without a shell)."""
    return shlex.split(config["envs"]["VLLM_COMMAND"])


def engines_of(config: dict) -> list[list[str]]:
    """Every engine's command line of a deployment of several models (one per line of VLLM_COMMAND)."""
    return [shlex.split(line) for line in config["envs"]["VLLM_COMMAND"].splitlines()]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]
