"""llm-atc top: a live view of what every running engine is doing, from its own metrics."""

from __future__ import annotations

import click

DEFAULT_INTERVAL = 5.0


@click.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option(
    "--interval",
    type=float,
    default=DEFAULT_INTERVAL,
    show_default=True,
    help="Seconds between samples (0.5 to 3600); rates and percentiles are over the last interval.",
)
@click.option("--once", is_flag=True, help="Take one window (two samples, --interval apart), print it and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --once: print the window as JSON.")
def top(names, interval, once, as_json):
    """Watch running deployments: requests in flight (on average over the interval), running and waiting (vLLM's
    gauges), time to first token and inter-token latency
    (p50/p95 over the last interval), prompt and output tokens/s, KV-cache use, prefix-cache hits, failed
    requests and $ per million output tokens; one row per engine (each model of a deployment of several).

    \b
    Examples:
      llm-atc top                         every running deployment, refreshed every 5 s (Ctrl-C ends it)
      llm-atc top my-llm --interval 2
      llm-atc top my-llm --once --json    one window, for scripts
    """
    import json
    import math
    import time

    from llm_atc import ui
    from llm_atc.app import top as app
    from llm_atc.errors import UserError
    from llm_atc.registry import Registry

    if not (isinstance(interval, float) and math.isfinite(interval) and 0.5 <= interval <= 3600):
        raise UserError(f"--interval {interval:g}: give seconds between samples, from 0.5 to 3600")
    if as_json and not once:
        raise click.UsageError("--json goes with --once (the live view is for a terminal)")
    registry = Registry()
    records = app.running(tuple(names), registry)
    if not records:
        ui.out("Nothing is running. Start a deployment with `llm-atc serve --cloud local`.")
        return
    with app.engines(records, registry) as engines:
        app.sample(engines)
        if once:
            time.sleep(interval)
            rows = app.sample(engines)
            if as_json:
                ui.raw_out(json.dumps({"interval": interval, "rows": [row.to_dict() for row in rows]}, indent=1) + "\n")
            else:
                ui.out(_table(rows))
            return
        from rich.live import Live

        try:
            with Live(_table([]), console=ui.stdout_console(), refresh_per_second=4) as live:
                while True:
                    time.sleep(interval)
                    live.update(_table(app.sample(engines)))
        except KeyboardInterrupt:
            return


def _table(rows):
    from rich.table import Table

    table = Table(box=None, header_style="bold", title="llm-atc top", title_justify="left")
    columns = ("DEPLOYMENT", "MODEL", "IN FLIGHT", "RUN", "WAIT", "TTFT P50/P95 MS", "ITL P50/P95 MS", "PROMPT TOK/S",
               "OUTPUT TOK/S", "KV %", "PREFIX HIT %", "FAILED", "$ / M OUT", "OUTPUT TREND")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("DEPLOYMENT", "MODEL", "OUTPUT TREND") else "right")
    for row in rows:
        w = row.window
        if w is None:
            table.add_row(row.deployment, row.model, row.note or "waiting for a second sample", *[""] * 11)
            continue
        pair = lambda a, b: "-" if a is None else f"{a:.0f}/{b:.0f}"
        percent = lambda v: "-" if v is None else f"{100 * v:.0f}"
        table.add_row(
            row.deployment,
            row.model,
            f"{w.in_flight:.1f}",
            f"{w.running:g}",
            f"{w.waiting:g}",
            pair(w.ttft_p50_ms, w.ttft_p95_ms),
            pair(w.itl_p50_ms, w.itl_p95_ms),
            f"{w.prompt_tokens_per_second:.1f}",
            f"{w.output_tokens_per_second:.1f}",
            percent(w.kv_cache_usage),
            percent(w.prefix_cache_hit_rate),
            f"{w.failed:g}",
            "-" if w.usd_per_million_output_tokens is None else f"{w.usd_per_million_output_tokens:.3g}",
            row.trend,
        )
    return table
