"""llm-atc logs: the engine's output."""

from __future__ import annotations

import click


@click.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
def logs(name, follow):
    """Print the engine logs of deployment or cluster NAME."""
    from llm_atc.app import lifecycle
    from llm_atc.registry import Registry

    raise SystemExit(lifecycle.logs(name, follow=follow, registry=Registry()) or 0)
