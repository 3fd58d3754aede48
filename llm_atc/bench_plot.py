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


def write(report, path: Path) -> Path:
    """Write ``report`` (``llm_atc.app.bench.Report``) as an HTML page at ``path``."""
    levels = report.levels
    xs = [level.concurrency for level in levels]
    charts = [
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
        chart("Output throughput", "tokens/s", xs, {"output tokens/s": [lv.output_tokens_per_second for lv in levels]}),
    ]
    if report.price_per_hour is not None:
        charts.append(
            chart(
                "Cost per million output tokens",
                "$",
                xs,
                {"$ / M tokens": [lv.usd_per_million_output_tokens or 0.0 for lv in levels]},
            )
        )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{cell}</td>"
            for cell in (
                lv.concurrency,
                f"{lv.ttft_p50_ms:.1f}",
                f"{lv.ttft_p95_ms:.1f}",
                f"{lv.itl_p50_ms:.2f}",
                f"{lv.itl_p95_ms:.2f}",
                f"{lv.output_tokens_per_second:.1f}",
                "-" if lv.usd_per_million_output_tokens is None else f"{lv.usd_per_million_output_tokens:.4g}",
                f"{lv.successful} / {lv.errored}",
            )
        )
        + "</tr>"
        for lv in levels
    )
    load = report.load
    price = "unknown" if report.price_per_hour is None else f"${report.price_per_hour:.4g}/hour"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llm-atc bench: {html.escape(report.deployment)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#111}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} svg{{margin:8px;border:1px solid #eee}}</style>
</head><body>
<h1>{html.escape(report.model)} on {html.escape(report.deployment)}</h1>
<p>{html.escape(report.endpoint)} &middot; {html.escape(report.tool)} &middot; {time.strftime("%Y-%m-%d %H:%M")}<br>
{load.prompt_tokens} prompt tokens, {load.output_tokens} output tokens per request; each level at most
{load.duration}s or {load.max_requests} requests &middot; price {html.escape(price)}
({html.escape(report.price_source)})</p>
<div>{"".join(charts)}</div>
<table><tr><th>concurrency</th><th>TTFT p50 ms</th><th>TTFT p95 ms</th><th>ITL p50 ms</th><th>ITL p95 ms</th>
<th>output tok/s</th><th>$ / M output tokens</th><th>ok / failed</th></tr>{rows}</table>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
