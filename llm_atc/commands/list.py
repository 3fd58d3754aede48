"""llm-atc list: training runs in the registry (and, with --remote, in the bucket)."""

from __future__ import annotations

import click

from llm_atc.recipes.train.contract import MODEL_TYPES


@click.command(name="list")
@click.option("--model_type", type=click.Choice(list(MODEL_TYPES)), help="Only runs of this type.")
@click.option("--name", "name_filter", help="Only runs whose name contains this.")
@click.option("--limit", type=int, help="At most this many runs (newest first).")
@click.option("--remote", is_flag=True, help="Also list llm-atc/ in the bucket and mark runs found in one place only.")
@click.option("--checkpoint_bucket", help="Bucket to list with --remote.")
@click.option("--checkpoint_store", type=click.Choice(["S3", "GCS"], case_sensitive=False), help="S3 or GCS.")
def list_(model_type, name_filter, limit, remote, checkpoint_bucket, checkpoint_store):
    """List fine-tuning runs: name, type, base model, checkpoint, status."""
    from rich.table import Table

    from llm_atc import ui
    from llm_atc.app.runs import list_runs

    rows = list_runs(
        model_type=model_type,
        name_filter=name_filter,
        limit=limit,
        remote=remote,
        bucket=checkpoint_bucket,
        store=checkpoint_store,
    )
    if not rows:
        ui.out("No training runs match. Start one with `llm-atc train`.")
        return
    table = Table(box=None, header_style="bold")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(ui.escape(str(v)) for v in row.values()))
    ui.out(table)
