"""llm-atc eval: score what a live vLLM deployment serves on held-out conversations, through its endpoint."""

from __future__ import annotations

import click

from llm_atc.app.evaluate import DEFAULT_LIMIT, DEFAULT_TIMEOUT


def data_options(func):
    """--data / --run: the conversations to score (eval and promote)."""
    func = click.option(
        "--run",
        "run_data",
        metavar="llm-atc/RUN",
        help="Score on the conversations this training run held out (train --eval_fraction).",
    )(func)
    return click.option(
        "--data",
        metavar="FILE",
        help="Score on these conversations: a file, s3:// or gs:// (ShareGPT JSON or OpenAI messages JSONL).",
    )(func)


def bound_options(func):
    """--limit / --timeout / --per_token: how much scoring at most, and how (eval and promote)."""
    func = click.option(
        "--per_token/--prompt_logprobs",
        default=None,
        help="Score token by token (a request per reference token) or from prompt log-probabilities (a request "
        "per conversation). Default: prompt log-probabilities, except on CPU engines with LoRA on, which vLLM's "
        "CPU build cannot give them from.",
    )(func)
    func = click.option(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        show_default=True,
        help="Seconds for the whole scoring; conversations not reached by then are left out (and said so).",
    )(func)
    return click.option(
        "--limit", type=int, default=DEFAULT_LIMIT, show_default=True, help="Conversations scored at most."
    )(func)


@click.command(name="eval")
@click.argument("deployment")
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME",
    help="A model or adapter it serves (repeat; default: its model and every adapter).",
)
@data_options
@bound_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(deployment, models, data, run_data, limit, timeout, per_token, as_json):
    """Score the models DEPLOYMENT serves on held-out conversations: the mean negative log-likelihood per token of
    the reference assistant turns (lower is better), with a 95% interval, and perplexity. The chat template is the
    one the server applies; scores are kept in the registry (the deployment's and each run's record).

    \b
    Default data: the held-out share of the run DEPLOYMENT serves.
    Examples:
      llm-atc eval my-llm --run llm-atc/support-v2
      llm-atc eval my-llm --model support --data ./golden.jsonl --json
    """
    import json

    from llm_atc import ui
    from llm_atc.app import evaluate
    from llm_atc.registry import Registry

    result = evaluate.evaluate_deployment(
        deployment,
        registry=Registry(),
        models=list(models),
        data=data,
        run=run_data,
        limit=limit,
        timeout=timeout,
        per_token=per_token,
    )
    evaluate.report(result)
    if as_json:
        ui.raw_out(json.dumps(result.details(), indent=2) + "\n")
        return
    ui.out(score_table(result.scores.values()))


def score_table(scores):
    """MODEL, NLL/TOKEN, 95% INTERVAL, PERPLEXITY, CHATS, TOKENS."""
    from rich.table import Table

    from llm_atc import ui

    table = Table(box=None, header_style="bold")
    for column in ("MODEL", "NLL/TOKEN", "95% INTERVAL", "PERPLEXITY", "CHATS", "TOKENS"):
        table.add_column(column, justify="left" if column == "MODEL" else "right")
    for s in scores:
        table.add_row(
            ui.escape(s.model),
            f"{s.nll:.4f}",
            f"{s.low:.4f} to {s.high:.4f}",
            f"{s.perplexity:.3f}",
            str(s.chats),
            str(s.tokens),
        )
    return table
