"""Defaults for the options people repeat, from ``$LLM_ATC_HOME/config.yaml`` (as SkyPilot's ``~/.sky/config.yaml``
and dstack's profiles do); a flag given on the command line wins.

    serve:
      cloud: gcp
      region: us-central1
      idle_minutes: 30
      max_hours: 8
    train:
      cloud: gcp
      max_hours: 12

Each key under a command is one of its options, by its Python name (the flag without the leading dashes).
"""

from __future__ import annotations

from pathlib import Path

from llm_atc.errors import UserError
from llm_atc.paths import home

FILE_NAME = "config.yaml"


def path() -> Path:

    return home() / FILE_NAME


def defaults() -> dict:
    """``{command: {option: value}}`` from the file, or {} without one; a damaged file is a one-line error."""
    found = path()
    if not found.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(found.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{found} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f"{found}: give each command's defaults as `command:` then `option: value` lines")
    return data


def check(command, defaults_for_command: dict) -> None:
    """Every default names an option of ``command`` (a click.Command), and none a flag that only makes sense
    once (a model, a cluster name)."""
    known = {param.name for param in command.params}
    for key in defaults_for_command:
        if key not in known:
            raise UserError(f"{path()}: `{command.name}` has no option {key!r}")
        if key in ONCE:
            raise UserError(f"{path()}: {key!r} names one launch; give it on the command line")


# Options that name one launch, not a habit.
ONCE = frozenset({"name", "cluster", "source", "finetune_data", "dryrun", "yes", "resume"})
