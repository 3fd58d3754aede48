"""llm-atc status: deployments and training runs, joined with their live state."""

from __future__ import annotations

import click


@click.command()
@click.argument("name", required=False)
@click.option("-a", "--all", "show_all", is_flag=True, help="Include torn-down deployments and older records.")
def status(name, show_all):
    """Show deployments (cloud and local) and training runs with their live status.

    With NAME, only that deployment or run; for a SkyServe service, also its replicas.
    """
    from rich.table import Table

    from llm_atc import ui
    from llm_atc.status import current_rows

    rows = current_rows(show_all=show_all, only=name)
    if name and not rows:
        from llm_atc.registry import Registry

        record = Registry().find(name)  # a one-line error naming the closest, for a name nothing has
        ui.out(f"{record.name} on {record.cluster} is {record.status} (llm-atc status -a shows ended ones)")
        return
    if not rows:
        ui.out("No deployments or training runs yet. Start one with `llm-atc serve --cloud local`.")
        return
    ui.out(_table(Table, ("NAME", "KIND", "CLUSTER", "INFRA", "ACCELERATOR", "STATUS", "ENDPOINT", "CREATED"), rows))
    if name:
        from llm_atc.app.lifecycle import lookup
        from llm_atc.backends import backend_for
        from llm_atc.registry import Registry

        record = lookup(name, Registry())
        if record.mode == "service":
            replicas = backend_for(record).replicas(record)
            ui.out(
                _table(Table, ("REPLICA", "STATUS", "INFRA", "RESOURCES", "$/HOUR"), replicas)
                if replicas
                else "No replicas yet."
            )


def _table(table_class, columns, rows):
    table = table_class(box=None, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table
