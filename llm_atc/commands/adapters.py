"""llm-atc adapters: LoRA adapters loaded into (and out of) a running vLLM deployment, no restart."""

from __future__ import annotations

import click


@click.group()
def adapters():
    """Add, remove or list the LoRA adapters a running deployment serves.

    vLLM deployments take adapters at runtime by default (serve's --max_loras, --max_lora_rank).
    An adapter answers under its NAME, next to the base model, as soon as `add` returns.

    \b
    Examples:
      llm-atc adapters add my-llm support=llm-atc/support-v2
      llm-atc adapters add my-llm sql=s3://my-bucket/llm-atc/sql-run
      llm-atc adapters list my-llm
      llm-atc adapters remove my-llm support
    """


@adapters.command()
@click.argument("deployment")
@click.argument("adapter", metavar="NAME=REF")
@click.option(
    "--envs",
    multiple=True,
    metavar="KEY=VAL",
    help="Bucket settings and keys for a bucket adapter (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), over the "
    "settings DEPLOYMENT was served with; used here only, never saved.",
)
def add(deployment, adapter, envs):
    """Load adapter REF into DEPLOYMENT under NAME. REF is llm-atc/<run>, s3://..., gs://..., a folder or a
    Hugging Face id, as with serve --lora. It must be trained on the model DEPLOYMENT serves."""
    from llm_atc import ui
    from llm_atc.app import adapters as app
    from llm_atc.errors import UserError
    from llm_atc.options import parse_env_pairs
    from llm_atc.registry import Registry

    name, sep, ref = adapter.partition("=")
    if not sep or not name.strip() or not ref.strip():
        raise UserError(f"{adapter!r}: give NAME=REF, e.g. support=llm-atc/my-run")
    registry = Registry()
    record = app.deployment(deployment, registry)
    store = parse_env_pairs(envs, option="--envs")
    checked = app.check_adapter(record, name.strip(), ref.strip(), registry, store)
    app.add(record, checked, registry, store)
    ui.info(f"{checked.name} (rank {checked.rank}) answers on {record.cluster} next to {record.name}.")
    ui.out(checked.name)


@adapters.command()
@click.argument("deployment")
@click.argument("name")
def remove(deployment, name):
    """Unload adapter NAME from DEPLOYMENT."""
    from llm_atc import ui
    from llm_atc.app import adapters as app
    from llm_atc.registry import Registry

    registry = Registry()
    record = app.deployment(deployment, registry)
    app.remove(record, name, registry)
    ui.info(f"{name} no longer answers on {record.cluster}.")


@adapters.command(name="list")
@click.argument("deployment")
def list_(deployment):
    """The adapters DEPLOYMENT serves now: where each came from, the version `llm-atc promote` put behind a name,
    and the held-out loss `llm-atc eval` measured last."""
    from rich.table import Table

    from llm_atc import ui
    from llm_atc.app import adapters as app
    from llm_atc.registry import Registry

    registry = Registry()
    record = app.deployment(deployment, registry)
    rows = app.listing(record, registry)
    lora = record.details["lora"]
    ui.info(
        f"{record.cluster} serves {record.name}; adapters up to rank {lora['max_rank']}, "
        f"{lora['max_loras']} active at once."
    )
    table = Table(box=None, header_style="bold")
    for column in ("ADAPTER", "FROM", "VERSION", "HELD-OUT NLL/TOKEN"):
        table.add_column(column)
    for name, source in rows:
        table.add_row(ui.escape(name), ui.escape(source), *map(ui.escape, app.standing(record, name)))
    ui.out(table if rows else "(no adapters)")
