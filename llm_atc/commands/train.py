"""llm-atc train: fine-tune a model and write a servable checkpoint to <bucket>/llm-atc/<run>/."""

from __future__ import annotations

import click

from llm_atc.commands._options import env_options, launch_options, lifetime_options, placement_options, sectioned
from llm_atc.recipes.train.contract import MODEL_TYPES

HELP_SECTIONS = (
    ("What to train", ("model_type", "finetune_data", "eval_fraction", "base_model", "name", "description", "resume",
                       "serve_on")),
    ("Where the model goes", ("checkpoint_bucket", "checkpoint_store")),
    ("Where it runs", ("cloud", "region", "zone", "cluster", "accelerator", "cpus", "memory", "use_spot", "disk_size",
                       "num_nodes", "keep_cluster")),
    ("Settings and secrets", ("envs", "secret")),
    ("Lifetime and cost", ("max_hours", "price_per_hour")),
    ("Launching", ("detach_setup", "detach_run", "no_setup", "yes", "dryrun", "help")),
)  # fmt: skip


@click.command(cls=sectioned(*HELP_SECTIONS))
@click.option(
    "--model_type",
    required=True,
    type=click.Choice(list(MODEL_TYPES)),
    help="vicuna: full fine-tune (FSDP); lora: LoRA adapters; qlora: LoRA on a 4-bit base.",
)
@click.option(
    "--finetune_data",
    required=True,
    help="Training data: a local file, s3:// or gs:// (ShareGPT/Vicuna JSON or OpenAI messages JSONL).",
)
@click.option(
    "--eval_fraction",
    type=float,
    help="Share of the conversations held out of training (0 to 0.5; default 0.05), chosen by a hash of each, so "
    "the same on every rerun; kept beside the model as eval.jsonl for `llm-atc eval` and `promote`.",
)
@click.option(
    "--checkpoint_bucket",
    help="Bucket that receives llm-atc/<run>/ (model, data, checkpoints). Default: a bucket of your own, "
    "created on first use (llm-atc-<random>), in the cloud's store.",
)
@click.option("--checkpoint_store", help="S3 or GCS (or local, with --cloud local). Default: GCS on gcp, else S3.")
@click.option("-n", "--name", help="Run name: serve it later as llm-atc/<name> (default: <model_type>-<time>).")
@click.option("--description", help="A note kept in the registry.")
@click.option(
    "--base_model",
    help="Model to fine-tune: a Hugging Face id, a folder, llm-atc/<run>, or llm-atc-demo (a tiny built-in model). "
    "Default: meta-llama/Llama-2-7b-hf on a cloud, llm-atc-demo with --cloud local.",
)
@placement_options(
    accelerator_default=None, accelerator_help="GPUs per node, NAME[:COUNT] such as A100-80GB:8 (required on a cloud)."
)
@click.option("--num_nodes", type=int, default=1, show_default=True, help="Nodes (full fine-tune uses FSDP).")
@env_options()
@click.option("--keep_cluster", is_flag=True, help="Keep the cluster up after the run (default: torn down).")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the failed or stopped run --name from its last checkpoint (same options as before).",
)
@click.option(
    "--serve_on",
    metavar="DEPLOYMENT",
    help="When the run succeeds, load its LoRA adapter into this running vLLM deployment, where it answers as "
    "llm-atc/<run> next to the base model (no restart; implies MERGE=0).",
)
@lifetime_options(serving=False)
@launch_options()
def train(**options):
    """Fine-tune a model (TRL + peft) on your data and record the run.

    \b
    Examples:
      llm-atc train --model_type lora --finetune_data ./chats.json --checkpoint_bucket my-bucket \\
          --checkpoint_store S3 --name my-run --accelerator A100:1 --envs HF_TOKEN
      llm-atc train --model_type lora --finetune_data ./chats.json --cloud local   # the built-in llm-atc-demo
      llm-atc train --model_type lora --finetune_data ./chats.json --base_model ./my-model --cloud local
    """
    from llm_atc import ui
    from llm_atc.app import launch
    from llm_atc.app.train import build_spec, prepare, serve_when_done
    from llm_atc.registry import Registry

    dryrun, yes, keep_cluster = options.pop("dryrun"), options.pop("yes"), options.pop("keep_cluster")
    options["secrets"] = options.pop("secret")
    registry = Registry()
    spec = build_spec(**options, registry=registry)
    prepared = prepare(spec, registry=registry, keep_cluster=keep_cluster, dryrun=dryrun)
    if dryrun:
        ui.raw_out(prepared.yaml)
        return
    spec = prepared.spec
    if not spec.is_local:
        where = spec.placement.infra or "the cheapest infra SkyPilot finds"
        from llm_atc.app.cost import Price, confirmation

        price = Price(**prepared.workload.record.details["price"])
        money = confirmation(price, spec.limits, otherwise="when the run ends")
        question = f"Train {spec.run} ({spec.model_type}, {spec.placement.resources_text} x{spec.num_nodes}, {where})"
        if not ui.confirm(f"{question}{money}?", yes=yes):
            raise SystemExit(ui.NOT_CONFIRMED)
    try:
        launch.train(prepared, registry=registry)
    except launch.Interrupted as exc:
        if spec.is_local:
            ui.info(f"Stopped {spec.run}; the same command with --resume continues from its last checkpoint.")
            raise
        ui.info(f"The run goes on on {spec.cluster}: llm-atc logs {spec.run} -f; llm-atc stop {spec.run}")
        raise SystemExit(128 + exc.signum) from None
    target = serve_when_done(spec, registry)
    if target is not None:
        ui.out(f"Run {spec.run}: {spec.output_uri}\nllm-atc/{spec.run} answers on {target.cluster} ({target.endpoint})")
        return
    local = " --cloud local" if spec.is_local else ""
    ui.out(f"Run {spec.run}: {spec.output_uri}\nServe it with: llm-atc serve --name llm-atc/{spec.run}{local}")
