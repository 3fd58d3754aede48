"""The ``llm-atc`` command line: parsing and rendering only.

Commands live in :mod:`llm_atc.commands` and are imported when used, so
``llm-atc --help`` never imports SkyPilot, torch or transformers.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from llm_atc import __version__

# command name -> (module in llm_atc.commands, one-line help shown by --help)
COMMANDS = {
    "serve": ("serve", "Serve a model behind an OpenAI-compatible endpoint."),
    "train": ("train", "Fine-tune a model; the result is served as llm-atc/<run>."),
    "list": ("list", "List fine-tuning runs."),
    "plan": ("plan", "Size a model: which GPUs fit, and what they cost."),
    "endpoint": ("endpoint", "Print a deployment's base URL."),
    "adapters": ("adapters", "Add, remove or list LoRA adapters of a running deployment (no restart)."),
    "eval": ("eval", "Score a deployment's models on held-out chats: loss per token and perplexity."),
    "promote": ("promote", "Switch a name to a better fine-tune, with no failed request (or roll it back)."),
    "bench": ("bench", "Load-test a deployment: TTFT, tokens/s and $ per million tokens."),
    "top": ("top", "Watch running deployments live: load, latency, tokens/s and cost, from the engines' metrics."),
    "status": ("status", "Show deployments and training runs."),
    "logs": ("logs", "Show a deployment's engine logs."),
    "stop": ("stop", "Stop a deployment (keeps its disk)."),
    "down": ("down", "Tear a deployment down."),
    "recipes": ("recipes", "List the recipes shipped with llm-atc."),
    "engines": ("engines", "Install or list the engines llm-atc runs on this machine (vLLM, guidellm)."),
}
ALIASES = {"show-models": "recipes"}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use, with one-line errors."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, cmd_name):
        cmd_name = ALIASES.get(cmd_name, cmd_name)
        if cmd_name not in COMMANDS:
            return None
        name = COMMANDS[cmd_name][0]
        module = importlib.import_module(f"llm_atc.commands.{name}")
        return getattr(module, name, None) or getattr(module, f"{name}_")  # list_ avoids the builtin

    def make_context(self, info_name, args, parent=None, **extra):
        """The defaults of $LLM_ATC_HOME/config.yaml, for each command's options (flags win)."""
        if "default_map" not in extra and not any(arg in ("-h", "--help", "--version") for arg in args[:1]):
            from llm_atc.config_file import defaults
            from llm_atc.errors import UserError

            try:
                extra["default_map"] = defaults()
            except UserError as exc:
                _fail(str(exc), exc.exit_code)
        return super().make_context(info_name, args, parent=parent, **extra)

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        mine = (ctx.default_map or {}).get(command.name) if command is not None else None
        if mine:
            from llm_atc.config_file import check
            from llm_atc.errors import UserError

            try:
                check(command, mine)
            except UserError as exc:
                _fail(str(exc), exc.exit_code)
        return name, command, rest

    def format_commands(self, ctx, formatter):
        rows = [(name, help_text) for name, (_, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        from llm_atc.errors import UserError
        from llm_atc.logfile import keep_library_logs

        keep_library_logs()
        try:
            return super().invoke(ctx)
        except UserError as exc:
            _fail(str(exc), exc.exit_code, exc.hint)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP while launching (llm_atc.app.launch)
            _fail("interrupted", 128 + getattr(exc, "signum", 2))
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as exc:  # an unexpected failure: still one line unless debugging
            if os.environ.get("LLM_ATC_DEBUG"):
                raise
            from llm_atc.logfile import log_exception

            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _fail(f"{type(exc).__name__}: {message} (the traceback is in {log_exception(exc)})", 1)


MAX_ERROR_LINE = 800  # a safety net: user text is shortened where it is quoted


def _fail(message: str, code: int, hint: str | None = None) -> None:
    from llm_atc import ui

    first, _, rest = message.partition("\n")
    if len(first) > MAX_ERROR_LINE:  # user text quoted at length: keep both ends
        first = f"{first[: MAX_ERROR_LINE // 2]} ... {first[-MAX_ERROR_LINE // 2 :]}"
    ui.error(ui.escape(first + ("\n" + rest if rest else "")))
    if hint:
        ui.info(hint)
    sys.exit(code)


START_HERE = """\b
Start here:
  llm-atc serve --cloud local            a built-in demo model on this machine (no GPU, no network)
  llm-atc serve --name Qwen/Qwen2.5-7B-Instruct --accelerator L4:1 --cloud gcp
                                         a model on your cloud, behind an OpenAI-compatible endpoint
\b
--cloud local runs everything (serve, train, bench) on this machine; any other infra goes through SkyPilot.
Each command's --help lists its options; docs/quickstart.md walks through the first hour. Defaults for the
options you repeat (--cloud, --region, --idle_minutes, ...) go in $LLM_ATC_HOME/config.yaml (see docs/cli.md)."""


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=START_HERE)
@click.version_option(__version__, prog_name="llm-atc")
def cli():
    """Fine-tune and serve open LLMs on your own cloud account through SkyPilot."""


def main():
    cli(prog_name="llm-atc")
