"""llm-atc endpoint: print a deployment's base URL, optionally checking it or tunnelling to it."""

from __future__ import annotations

import click


@click.command()
@click.argument("name")
@click.option(
    "--check",
    is_flag=True,
    help="Query the engine: print the served model ids, and send each model one real request of its kind "
    "(a 1-token completion, an embedding, a rerank or a classification).",
)
@click.option(
    "--port", type=int, default=8000, show_default=True, help="Engine port, for clusters llm-atc did not launch."
)
@click.option(
    "--forward",
    is_flag=True,
    help="Open an SSH tunnel to the engine (for nodes you cannot reach directly), print its local "
    "URL and keep it open until Ctrl-C.",
)
@click.option("--local_port", type=int, help="Local port of the --forward tunnel (default: a free one).")
@click.option("--show_key", is_flag=True, help="Print the deployment's API key (and nothing else).")
def endpoint(name, check, port, forward, local_port, show_key):
    """Print the base URL (http://HOST:PORT/v1) of deployment or cluster NAME."""
    from llm_atc import credentials, ui
    from llm_atc.app import lifecycle
    from llm_atc.errors import NotFoundError
    from llm_atc.registry import Registry

    if local_port is not None and not forward:
        raise click.UsageError("--local_port goes with --forward")
    registry = Registry()
    record = lifecycle.lookup(name, registry, port=port)
    api_key = credentials.get(record.cluster)
    if show_key:
        if not api_key:
            raise NotFoundError(
                f"{record.name} on {record.cluster} has no API key here "
                "(served with --no_auth, by transformers, or locally)"
            )
        ui.out(api_key)
        return

    def show(base: str) -> None:
        ui.out(base.rstrip("/") + "/v1")
        if check:
            _check(base, record, api_key)

    if not forward:
        show(lifecycle.endpoint(record, registry=registry)[1])
        return
    with lifecycle.forward(record, local_port=local_port) as tunnel:
        show(tunnel.endpoint)
        ui.info(f"Forwarding {tunnel.endpoint} to port {record.port or port} on {record.cluster}; Ctrl-C closes it.")
        try:
            tunnel.wait()
        except KeyboardInterrupt:
            ui.info("Tunnel closed.")


def _check(base: str, record, api_key: str | None) -> None:
    """Every model id the endpoint lists; each of the deployment's own models answers one real request."""
    from llm_atc import ui
    from llm_atc.app.lifecycle import check_models
    from llm_atc.errors import LaunchError

    answers, missing = check_models(base, record, api_key)
    for model, answer in answers:
        ui.out(f"  {model}  {answer}".rstrip())
    if missing:
        listed = ", ".join(model for model, _ in answers)
        raise LaunchError(f"the endpoint does not list {', '.join(missing)} among its models ({listed})")
