"""Click options shared by several commands (names follow the original llm-atc CLI)."""

from __future__ import annotations

import click

from llm_atc.options import SECRET_RULE


class SectionedCommand(click.Command):
    """A command whose --help lists its options in named sections, in the order ``sections`` gives."""

    sections: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def format_options(self, ctx, formatter):
        records = {param.name: param.get_help_record(ctx) for param in self.get_params(ctx)}
        placed: set[str] = set()
        for title, names in self.sections:
            rows = [records[name] for name in names if records.get(name)]
            placed.update(names)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        rest = [record for name, record in records.items() if record and name not in placed]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)


def sectioned(*sections: tuple[str, tuple[str, ...]]) -> type[SectionedCommand]:
    """A command class for ``@click.command(cls=...)`` with these help sections: (title, option names)."""
    return type("Sectioned", (SectionedCommand,), {"sections": sections})


def _apply(options):
    def decorator(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorator


def placement_options(*, accelerator_default: str | None, accelerator_help: str):
    """--accelerator --cloud --region --zone --cpus --memory --use_spot --disk_size -c/--cluster."""
    return _apply(
        [
            click.option(
                "--accelerator",
                default=accelerator_default,
                show_default=bool(accelerator_default),
                help=accelerator_help,
            ),
            click.option("-c", "--cluster", help="Cluster name (default: derived from --name)."),
            click.option(
                "--cloud",
                help="SkyPilot infra: aws, gcp, azure, lambda, kubernetes, slurm, ... or `local` for this machine.",
            ),
            click.option("--region", help="Region (needs --cloud); for slurm, the cluster's name."),
            click.option("--zone", help="Zone (needs --region)."),
            click.option("--cpus", help="vCPUs per node, SkyPilot syntax: 4 (exactly) or 4+ (at least)."),
            click.option("--memory", help="Memory per node in GB, SkyPilot syntax: 16 or 16+."),
            click.option("--use_spot", is_flag=True, help="Use spot instances."),
            click.option("--disk_size", type=int, help="Disk size in GB."),
        ]
    )


def lifetime_options(*, serving: bool):
    """--idle_minutes (serving) --max_hours --price_per_hour: how it ends by itself, and what it costs."""
    options = [
        click.option(
            "--max_hours",
            type=float,
            help="End it after this many hours, whatever it is doing (0.01 to 8760; SkyPilot's autodown removes the "
            "cluster)" + ("." if serving else "; the run keeps its last checkpoint, --resume goes on."),
        ),
        click.option(
            "--price_per_hour",
            type=float,
            help="What it costs per hour, in dollars, for `status`'s cost columns (default: SkyPilot's catalog "
            "price of its GPUs; none for local, Slurm and Kubernetes).",
        ),
    ]
    if serving:
        options.insert(
            0,
            click.option(
                "--idle_minutes",
                type=float,
                help="End the deployment after this many minutes without a request (0.5 to 10080; vLLM's own "
                "request counts, not health checks). A service (--replicas 0..N) scales to zero instead.",
            ),
        )
    return _apply(options)


def env_options():
    """-e/--envs and --secret."""
    return _apply(
        [
            click.option(
                "-e",
                "--envs",
                multiple=True,
                metavar="KEY=VAL",
                help="Env vars for the task: KEY=VAL, KEY (taken from your environment), or several "
                f"space-separated in one value. Secrets (never saved or printed): {SECRET_RULE}.",
            ),
            click.option(
                "--secret",
                multiple=True,
                metavar="KEY=VAL",
                help="Like --envs, but always passed as a SkyPilot secret (never saved or printed).",
            ),
        ]
    )


def launch_options():
    """--detach_setup --detach_run --no_setup -y/--yes --dryrun."""
    return _apply(
        [
            click.option("--detach_setup", is_flag=True, help="Do not stream provisioning and setup logs."),
            click.option("--detach_run", is_flag=True, help="Return once the job is submitted; do not wait."),
            click.option("--no_setup", is_flag=True, help="Skip the recipe's setup (cluster already set up)."),
            click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation."),
            click.option("--dryrun", is_flag=True, help="Print the final SkyPilot task YAML and launch nothing."),
        ]
    )
