"""The page `llm-atc bench` writes: its figures as charts and a table, in one self-contained HTML file
(inline SVG, no scripts, nothing fetched), to open in any browser."""

from __future__ import annotations

import html
import time
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 520, 300, 56
COLOURS = ("#2563eb", "#dc2626", "#059669")


def _axis_max(values: list[float]) -> float:
    top = max([v for v in values if v is not None] + [0.0])
    return top * 1.15 if top > 0 else 1.0


def chart(title: str, unit: str, xs: list[int], series: dict[str, list[float]]) -> str:
    """A line chart of ``series`` (name -> one value per x) over the concurrencies ``xs`` (evenly spaced)."""
    top = _axis_max([v for values in series.values() for v in values])
    inner_w, inner_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN
    x_at = lambda i: MARGIN + (inner_w * i / max(len(xs) - 1, 1) if len(xs) > 1 else inner_w / 2)
    y_at = lambda v: MARGIN + inner_h * (1 - v / top)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
        f'<line x1="{MARGIN}" y1="{MARGIN + inner_h}" x2="{MARGIN + inner_w}" y2="{MARGIN + inner_h}" stroke="#333"/>',
        f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{MARGIN + inner_h}" stroke="#333"/>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">concurrency</text>',
        f'<text x="14" y="{HEIGHT / 2}" transform="rotate(-90 14 {HEIGHT / 2})" text-anchor="middle">'
        f"{html.escape(unit)}</text>",
    ]
    for tick in range(5):
        value = top * tick / 4
        y = y_at(value)
        parts.append(f'<line x1="{MARGIN - 4}" y1="{y:.1f}" x2="{MARGIN + inner_w}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{MARGIN - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{value:.3g}</text>')
    for i, x in enumerate(xs):
        parts.append(
            f'<text x="{x_at(i):.1f}" y="{MARGIN + inner_h + 16}" text-anchor="middle" font-size="11">{x}</text>'
        )
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        points = " ".join(f"{x_at(i):.1f},{y_at(v):.1f}" for i, v in enumerate(values))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        parts += [
            f'<circle cx="{x_at(i):.1f}" cy="{y_at(v):.1f}" r="3" fill="{colour}"><title>{x}: {v:.4g}</title></circle>'
            for i, (x, v) in enumerate(zip(xs, values, strict=True))
        ]
        parts.append(
            f'<text x="{MARGIN + 8 + index * 150}" y="{MARGIN - 10}" fill="{colour}" font-size="12">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def rows(report) -> tuple[list[str], list[list[str]]]:
    """The table of a report, as headings and rows of text (the terminal's table and the page's)."""
    cost = lambda value: "-" if value is None else f"{value:.4g}"
    if report.task == "embed":
        headings = ["concurrency", "latency p50 ms", "latency p95 ms", "requests/s", "input tok/s", "$ / M input tok"]
        cells = [
            [
                str(lv.concurrency),
                f"{lv.latency_p50_ms:.1f}",
                f"{lv.latency_p95_ms:.1f}",
                f"{lv.requests_per_second:.1f}",
                f"{lv.input_tokens_per_second:.0f}",
                cost(lv.usd_per_million_input_tokens),
            ]
            for lv in report.levels
        ]
    else:
        headings = ["concurrency", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms", "output tok/s"]
        headings.append("$ / M output tok")
        cells = [
            [
                str(lv.concurrency),
                f"{lv.ttft_p50_ms:.1f}",
                f"{lv.ttft_p95_ms:.1f}",
                f"{lv.itl_p50_ms:.2f}",
                f"{lv.itl_p95_ms:.2f}",
                f"{lv.output_tokens_per_second:.1f}",
                cost(lv.usd_per_million_output_tokens),
            ]
            for lv in report.levels
        ]
    for row, lv in zip(cells, report.levels, strict=True):
        row += [str(lv.successful), str(lv.errored)]
    return [*headings, "ok", "failed"], cells


def _charts(report) -> list[str]:
    levels = report.levels
    xs = [level.concurrency for level in levels]
    if report.task == "embed":
        found = [
            chart(
                "Request latency",
                "ms",
                xs,
                {"p50": [lv.latency_p50_ms for lv in levels], "p95": [lv.latency_p95_ms for lv in levels]},
            ),
            chart("Throughput", "requests/s", xs, {"requests/s": [lv.requests_per_second for lv in levels]}),
        ]
        cost = ("Cost per million input tokens", [lv.usd_per_million_input_tokens or 0.0 for lv in levels])
    else:
        found = [
            chart(
                "Time to first token",
                "ms",
                xs,
                {"p50": [lv.ttft_p50_ms for lv in levels], "p95": [lv.ttft_p95_ms for lv in levels]},
            ),
            chart(
                "Inter-token latency",
                "ms",
                xs,
                {"p50": [lv.itl_p50_ms for lv in levels], "p95": [lv.itl_p95_ms for lv in levels]},
            ),
            chart(
                "Output throughput", "tokens/s", xs, {"output tokens/s": [lv.output_tokens_per_second for lv in levels]}
            ),
        ]
        cost = ("Cost per million output tokens", [lv.usd_per_million_output_tokens or 0.0 for lv in levels])
    if report.price_per_hour is not None:
        found.append(chart(cost[0], "$", xs, {"$ / M tokens": cost[1]}))
    return found


def write(report, path: Path) -> Path:
    """Write ``report`` (``llm_atc.app.bench.Report``) as an HTML page at ``path``."""
    headings, cells = rows(report)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    load = report.load
    price = "unknown" if report.price_per_hour is None else f"${report.price_per_hour:.4g}/hour"
    sizes = (
        f"{load.prompt_tokens}-token texts embedded per request"
        if report.task == "embed"
        else f"{load.prompt_tokens} prompt tokens, {load.output_tokens} output tokens per request"
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llm-atc bench: {html.escape(report.deployment)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#111}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} svg{{margin:8px;border:1px solid #eee}}</style>
</head><body>
<h1>{html.escape(report.model)} on {html.escape(report.deployment)}</h1>
<p>{html.escape(report.endpoint)} &middot; {html.escape(report.tool)} &middot; {time.strftime("%Y-%m-%d %H:%M")}<br>
{sizes}; each level at most {load.duration}s or {load.max_requests} requests &middot; price {html.escape(price)}
({html.escape(report.price_source)})</p>
<div>{"".join(_charts(report))}</div>
<table><tr>{head}</tr>{body}</table>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
