"""llm-atc recipes (alias show-models): the SkyPilot task recipes shipped with llm-atc."""

from __future__ import annotations

import click


@click.command()
@click.option("--path", "show_path", is_flag=True, help="Also print where each recipe file is.")
def recipes(show_path):
    """List the recipes and what each is for (each runs on its own with `sky launch FILE`)."""
    from rich.table import Table

    from llm_atc import ui
    from llm_atc.recipes_catalog import all_recipes

    table = Table(box=None, header_style="bold")
    table.add_column("RECIPE")
    table.add_column("WHAT IT DOES")
    if show_path:
        table.add_column("FILE")
    for recipe in all_recipes():
        row = [recipe.ref, recipe.summary] + ([str(recipe.path)] if show_path else [])
        table.add_row(*row)
    ui.out(table)
