"""llm-atc bench: load-test a live deployment and report latency, throughput and dollars per token."""

from __future__ import annotations

import click


@click.command()
@click.argument("deployment")
@click.option("--model", help="Which model to load, on a deployment of several (default: the first).")
@click.option(
    "--concurrency",
    metavar="N,N,...",
    help="Requests in flight at each level, run one level after another (default 1,4,16; at most 8 levels).",
)
@click.option("--prompt_tokens", type=int, default=256, show_default=True, help="Tokens of each synthetic prompt.")
@click.option(
    "--output_tokens",
    type=int,
    default=128,
    show_default=True,
    help="Tokens each reply is asked for (an embedding model gets texts of --prompt_tokens, no reply).",
)
@click.option("--duration", type=int, default=20, show_default=True, help="Seconds at most per level (1-600).")
@click.option("--max_requests", type=int, default=200, show_default=True, help="Requests at most per level (1-100000).")
@click.option(
    "--price_per_hour",
    type=float,
    help="Dollars per hour of the deployment (default: SkyPilot's catalog price of its GPUs; needed for "
    "local, Slurm and Kubernetes deployments to get $ per million tokens).",
)
@click.option(
    "--tokenizer",
    metavar="FOLDER|HUB_ID",
    help="Tokenizer for the synthetic prompts (default: the served model's own).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of a table.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Where to write the HTML charts (default: $LLM_ATC_HOME/bench/<deployment>-<time>/report.html).",
)
def bench(
    deployment,
    model,
    concurrency,
    prompt_tokens,
    output_tokens,
    duration,
    max_requests,
    price_per_hour,
    tokenizer,
    as_json,
    plot,
):
    """Load-test DEPLOYMENT with guidellm: TTFT, inter-token latency, output tokens/s and $ per million
    output tokens at several concurrencies, each level bounded in time and requests. An embedding model
    gets embedding requests: latency, requests/s, input tokens/s and $ per million input tokens.

    \b
    Examples:
      llm-atc bench llm-atc-vicuna-13b-v1-3
      llm-atc bench my-llm --concurrency 1,8,32 --prompt_tokens 1024 --output_tokens 256 --duration 60
      llm-atc bench llm-atc-demo --price_per_hour 0.35 --json
    """
    import json
    import time
    from pathlib import Path

    from llm_atc import ui
    from llm_atc.app import bench as app
    from llm_atc.bench_plot import write
    from llm_atc.paths import home
    from llm_atc.registry import Registry

    load = app.parse_load(concurrency, prompt_tokens, output_tokens, duration, max_requests)
    app.check_price(price_per_hour)
    registry = Registry()
    record = app.deployment(deployment, registry)
    served, _ = app.pick_model(record, model)
    task = app.measurable_task(record, served)
    out_dir = home() / "bench" / f"{record.cluster}-{time.strftime('%Y%m%d-%H%M%S')}"
    sizes = (
        f"embedding {load.prompt_tokens}-token texts"
        if task == "embed"
        else f"{load.prompt_tokens} prompt / {load.output_tokens} output tokens"
    )
    ui.info(
        f"Measuring {record.cluster} at concurrency {', '.join(map(str, load.concurrency))}: {sizes}, each level "
        f"at most {load.duration}s or {load.max_requests} requests (all told at most {load.bound_seconds}s)"
    )
    report = app.run(
        record,
        model=model,
        load=load,
        tokenizer=tokenizer,
        price=price_per_hour,
        registry=registry,
        out_dir=out_dir,
    )
    report.plot = str(write(report, Path(plot) if plot else out_dir / "report.html"))
    for message in report.errors:
        ui.warn(f"a request failed: {message}")
    if as_json:
        ui.raw_out(json.dumps(report.to_dict(), indent=1) + "\n")
        return
    ui.out(_table(report))
    if report.price_per_hour is None:
        ui.info(f"$ per million tokens: {report.price_source}.")
    else:
        ui.info(f"Price: ${report.price_per_hour:.4g}/hour ({report.price_source}).")
    ui.info(f"Charts: {report.plot}\nguidellm's own results: {report.raw}")


def _table(report):
    from rich.table import Table

    from llm_atc.bench_plot import rows

    headings, cells = rows(report)
    table = Table(title=f"{report.model} on {report.deployment}", box=None, header_style="bold")
    for column in headings:
        table.add_column(column.upper(), justify="right")
    for row in cells:
        table.add_row(*row)
    return table
