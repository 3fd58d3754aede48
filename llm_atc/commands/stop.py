"""llm-atc stop: stop a deployment, keeping its disk."""

from __future__ import annotations

import click


@click.command()
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def stop(name, yes):
    """Stop deployment or cluster NAME (restart it with `llm-atc serve`)."""
    from llm_atc.app.lifecycle import end
    from llm_atc.registry import Registry

    end(name, action="stop", yes=yes, registry=Registry())
