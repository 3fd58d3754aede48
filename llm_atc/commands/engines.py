"""llm-atc engines: the environments llm-atc manages on this machine (vLLM for local serving, guidellm for bench)."""

from __future__ import annotations

import click


@click.group(invoke_without_command=True)
@click.pass_context
def engines(ctx):
    """List, install or remove engine environments (each a virtualenv of its own, under
    $LLM_ATC_ENGINES, default ~/.llm_atc/engines).

    vLLM and guidellm pin packages that SkyPilot's own pins exclude, so each gets an environment of
    its own: `serve --cloud local` runs vLLM (and vLLM's router) from there, `bench` runs guidellm.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_)


@engines.command(name="list")
def list_():
    """Show each engine llm-atc knows and whether it is installed here."""
    from rich.table import Table

    from llm_atc import engines as store
    from llm_atc import ui

    table = Table(box=None, header_style="bold")
    for column in ("ENGINE", "STATUS", "BUILD", "VERSION", "PATH", "WHAT IT IS"):
        table.add_column(column)
    for engine in store.ENGINES.values():
        found = store.installed(engine.name)
        if found is None:
            table.add_row(engine.name, "not installed", "-", engine.version, "-", engine.summary)
        else:
            state = "installed" if found.usable_here() else "installed (needs a CUDA GPU)"
            table.add_row(engine.name, state, found.build, found.version, str(found.path), engine.summary)
    ui.out(table)


@engines.command()
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option(
    "--build",
    type=click.Choice(["cpu", "cuda"]),
    help="vLLM build (default: cuda when nvidia-smi lists a GPU, else cpu; guidellm is always cpu).",
)
@click.option(
    "--torch_index",
    metavar="URL",
    help="Index for the CPU build's torch (default: pip's own settings when they have it, else "
    "https://download.pytorch.org/whl/cpu); '' uses pip's settings only.",
)
@click.option("--force", is_flag=True, help="Replace an environment that is already installed.")
def install(names, build, torch_index, force):
    """Install each engine NAME (vllm, guidellm) into an environment of its own."""
    from llm_atc import engines as store
    from llm_atc import ui

    for name in names:
        store.get_engine(name)  # every name is checked before anything installs
    for name in names:
        found = store.install(name, build=build if name == "vllm" else None, torch_index=torch_index, force=force)
        ui.out(str(found.path))


@engines.command()
@click.argument("name")
def remove(name):
    """Delete the environment of engine NAME."""
    from llm_atc import engines as store
    from llm_atc import ui

    ui.info(f"Removed {store.remove(name)}")
