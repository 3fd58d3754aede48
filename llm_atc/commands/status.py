"""llm-atc status: deployments and training runs, joined with their live state."""

from __future__ import annotations

import click


@click.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Include torn-down deployments and older records.")
def status(show_all):
    """Show deployments (cloud and local) and training runs with their live status."""
    from rich.table import Table

    from llm_atc import ui
    from llm_atc.status import current_rows

    rows = current_rows(show_all=show_all)
    if not rows:
        ui.out("No deployments or training runs yet. Start one with `llm-atc serve --name MODEL`.")
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "KIND", "CLUSTER", "INFRA", "ACCELERATOR", "STATUS", "ENDPOINT", "CREATED"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    ui.out(table)
