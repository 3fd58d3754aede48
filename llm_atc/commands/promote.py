"""llm-atc promote: switch a stable model name to a better fine-tune, with no failed request (or roll it back)."""

from __future__ import annotations

import click

from llm_atc.commands.eval import bound_options, data_options


@click.command()
@click.argument("run", metavar="llm-atc/RUN", required=False)
@click.option("--on", "on", required=True, metavar="DEPLOYMENT", help="The running deployment that serves NAME.")
@click.option("--as", "name", required=True, metavar="NAME", help="The model name clients call (model=NAME).")
@click.option(
    "--min_gain",
    type=float,
    default=0.0,
    show_default=True,
    help="How much lower (nats per token) RUN's held-out loss must be than what NAME serves now, over "
    "the whole 95% interval of the difference.",
)
@click.option("--force", is_flag=True, help="Switch even when RUN is not better (the scores are still shown).")
@click.option("--rollback", is_flag=True, help="Switch NAME back to the version it served before (no RUN).")
@click.option(
    "--blue_green",
    is_flag=True,
    help="A full model on a SkyServe service: switch traffic once every new replica is ready (default: rolling).",
)
@data_options
@bound_options
@click.option(
    "--secret",
    multiple=True,
    metavar="KEY=VAL",
    help="A service's secrets other than its API key (HF_TOKEN, ...), for the replicas an update "
    "starts; used here only, never saved.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def promote(
    run, on, name, min_gain, force, rollback, blue_green, data, run_data, limit, timeout, per_token, secret, as_json
):
    """Serve fine-tune RUN as NAME on DEPLOYMENT if it scores better than what NAME serves now (its held-out loss,
    measured through the endpoint on RUN's held-out conversations unless --data or --run says otherwise); the
    switch drops no request, and the previous version stays loaded for --rollback.

    \b
    Examples:
      llm-atc promote llm-atc/support-v3 --on my-llm --as support
      llm-atc promote llm-atc/support-v3 --on my-llm --as support --run llm-atc/support-v2 --min_gain 0.02
      llm-atc promote --rollback --on my-llm --as support
    """
    import json

    from llm_atc import ui
    from llm_atc.app import promote as app
    from llm_atc.errors import UserError
    from llm_atc.options import parse_env_pairs
    from llm_atc.registry import Registry

    secrets = parse_env_pairs(secret, option="--secret")
    if rollback and run:
        raise UserError("--rollback takes no RUN: it returns NAME to the version it served before")
    if not rollback:
        if not run:
            raise UserError("give the run to promote (llm-atc/RUN), or --rollback")
        app.check_options(name, min_gain, data, run_data, limit, timeout)
    registry = Registry()
    if rollback:
        done = app.rollback(on=on, name=name, registry=registry, secrets=secrets)
        ui.info(f"{done.name} on {done.deployment} serves version {done.version} again (llm-atc/{done.run}).")
    else:
        done = app.promote(
            run,
            on=on,
            name=name,
            registry=registry,
            min_gain=min_gain,
            force=force,
            data=data,
            data_run=run_data,
            limit=limit,
            timeout=timeout,
            blue_green=blue_green,
            secrets=secrets,
            per_token=per_token,
        )
        if done.gain is not None:
            ui.info(f"{done.gain.candidate.model}: {done.gain.candidate.text()}")
            ui.info(f"{done.gain.current.model}: {done.gain.current.text()}")
            ui.info(f"gain: {done.gain.text()}" + (" (below --min_gain: switched by --force)" if done.forced else ""))
        ui.info(
            f"{done.name} on {done.deployment} now serves llm-atc/{done.run} as version {done.version}; "
            f"back: llm-atc promote --rollback --on {done.deployment} --as {done.name}"
        )
    if as_json:
        result = {
            "name": done.name,
            "deployment": done.deployment,
            "version": done.version,
            "run": done.run,
            "forced": done.forced,
            **(
                {
                    "current": done.gain.current.details(),
                    "candidate": done.gain.candidate.details(),
                    **done.gain.details(),
                }
                if done.gain
                else {}
            ),
        }
        ui.raw_out(json.dumps(result, indent=2) + "\n")
        return
    ui.out(f"{done.name}@v{done.version}")
