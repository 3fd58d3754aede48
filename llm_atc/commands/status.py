"""llm-atc status: deployments and training runs, joined with their live state."""

from __future__ import annotations

import click


@click.command()
@click.argument("name", required=False)
@click.option("-a", "--all", "show_all", is_flag=True, help="Include torn-down deployments and older records.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (with their costs) instead of a table.")
def status(name, show_all, as_json):
    """Show deployments (cloud and local) and training runs with their live status, how long each has been up,
    its hourly price and what it has cost so far.

    With NAME, only that deployment or run; for a SkyServe service, also its replicas.
    """
    import json

    from rich.table import Table

    from llm_atc import ui
    from llm_atc.status import COLUMNS, rows

    found = rows(show_all=show_all, only=name)
    if name and not found:
        from llm_atc.registry import Registry

        record = Registry().find(name)  # a one-line error naming the closest, for a name nothing has
        if not as_json:
            ui.out(f"{record.name} on {record.cluster} is {record.status} (llm-atc status -a shows ended ones)")
            return
    if as_json:
        total = sum(row.cost_so_far or 0 for row in found)
        ui.raw_out(json.dumps({"rows": [row.to_dict() for row in found], "cost_so_far": round(total, 4)}, indent=1))
        ui.raw_out("\n")
        return
    if not found:
        ui.out("No deployments or training runs yet. Start one with `llm-atc serve --cloud local`.")
        return
    ui.out(_table(Table, COLUMNS, [row.cells() for row in found]))
    known = [row.cost_so_far for row in found if row.cost_so_far is not None]
    if known:
        unknown = sum(1 for row in found if row.cost_so_far is None and row.price_source != "own hardware")
        ui.out(f"Cost so far: ${sum(known):.2f}" + (f" ({unknown} without a known price)" if unknown else ""))
    if name:
        from llm_atc.app import lifecycle
        from llm_atc.registry import Registry

        record = lifecycle.lookup(name, Registry())
        if record.mode == "service":
            replicas = lifecycle.replicas(record)
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
