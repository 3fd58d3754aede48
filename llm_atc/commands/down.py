"""llm-atc down: tear a deployment down."""

from __future__ import annotations

import click


@click.command()
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def down(name, yes):
    """Tear down deployment or cluster NAME (all its resources and disks)."""
    from llm_atc.app.lifecycle import end
    from llm_atc.registry import Registry

    end(name, action="down", yes=yes, registry=Registry())
