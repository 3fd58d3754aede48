"""llm-atc endpoint: print a deployment's base URL, optionally checking what it serves."""

from __future__ import annotations

import click


@click.command()
@click.argument("name")
@click.option("--check", is_flag=True, help="Query /v1/models and print the served model ids.")
@click.option("--port", type=int, default=8000, show_default=True,
              help="Engine port, for clusters llm-atc did not launch.")
def endpoint(name, check, port):
    """Print the base URL (http://HOST:PORT/v1) of deployment or cluster NAME."""
    from llm_atc import ui
    from llm_atc.backends import backend_for, lookup
    from llm_atc.readiness import served_models

    record = lookup(name, port=port)
    base = backend_for(record).endpoint(record)
    ui.out(base.rstrip("/") + "/v1")
    if check:
        for model in served_models(base, record.engine or "vllm", record.name):
            ui.out(f"  {model}")
