"""llm-atc plan: which GPUs fit a model, and what they cost, from SkyPilot's catalog."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "-n",
    "--name",
    required=True,
    multiple=True,
    help="Model: a Hugging Face id, llm-atc/<run> (a checkpoint we trained) or a local folder. Repeat it to "
    "plan several models on one node (serve --name A --name B).",
)
@click.option("--source", help="s3:// or gs:// URI of the checkpoint to size under --name (wins over the registry).")
@click.option(
    "--mode",
    type=click.Choice(["serve", "full", "lora", "qlora"]),
    default="serve",
    show_default=True,
    help="serve: vLLM weights + KV cache; full: full fine-tune (Adam state); lora: LoRA on a 16-bit "
    "base; qlora: LoRA on a 4-bit base.",
)
@click.option(
    "--max_model_len",
    type=int,
    help="serve: context length to size the KV cache for (default: the model's, at most 32768); "
    "training: sequence length (default 2048).",
)
@click.option(
    "--task",
    type=click.Choice(["auto", "generate", "embed", "rerank", "classify"]),
    default="auto",
    show_default=True,
    help="serve: what the model serves (as serve --task); embed, rerank and classify keep no KV cache.",
)
@click.option("--dtype", help="Weights dtype: auto, half, float16, bfloat16, float32 (serve).")
@click.option("--quantization", help="vLLM quantization method, e.g. awq, gptq, fp8, bitsandbytes (serve).")
@click.option("--cloud", help="Only this cloud's offers (default: every cloud whose SkyPilot catalog is on disk).")
@click.option("--region", help="Only this region (needs --cloud).")
@click.option("--use_spot", is_flag=True, help="Price and sort by spot prices.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(name, source, mode, max_model_len, task, dtype, quantization, cloud, region, use_spot, as_json):
    """Size a model's GPU memory and list the GPUs that fit it, cheapest first.

    Parameters come from the model's config.json (or its safetensors index),
    prices from SkyPilot's GPU catalog. The first line of the table is what
    `--accelerator auto` picks.

    \b
    Examples:
      HF_TOKEN=hf_... llm-atc plan --name meta-llama/Llama-2-70b-hf
      llm-atc plan --name ./my-model --mode qlora --cloud gcp --use_spot
      llm-atc plan --name Qwen/Qwen2.5-7B-Instruct --max_model_len 8192 --json
      llm-atc plan --name Qwen/Qwen2.5-7B-Instruct --name mistralai/Mistral-7B-Instruct-v0.3
    """
    import json

    from llm_atc import ui
    from llm_atc.app.plan import plan_model, plan_models
    from llm_atc.errors import UserError
    from llm_atc.options import check_number

    check_number(max_model_len, "--max_model_len")
    if len(name) > 1 and task != "auto":
        raise click.UsageError("--task applies to one model; several --name are each planned for what they serve")
    options = dict(max_model_len=max_model_len, dtype=dtype, quantization=quantization, cloud=cloud, region=region,
                   use_spot=use_spot)  # fmt: skip
    if len(name) > 1:
        if mode != "serve" or source:
            raise UserError("several --name plan a deployment of several models: --mode serve, without --source")
        joint = plan_models(name, **options)
        if as_json:
            ui.raw_out(json.dumps(joint.to_dict(), indent=2) + "\n")
        else:
            _render_several(joint)
        return
    if task != "auto" and mode != "serve":
        raise click.UsageError(f"--task {task} goes with --mode serve")
    found = plan_model(name[0], source, mode=mode, task=task, **options)
    if as_json:
        weights = {"weights": {"stream": found.weights.stream, "note": found.weights.note}} if found.weights else {}
        serving = {"serving": found.serving} if found.serving else {}
        ui.raw_out(json.dumps({**found.plan.to_dict(), **weights, **serving}, indent=2) + "\n")
        return
    _render(found.plan)
    if found.serving_text:
        ui.out(f"Serves: {ui.escape(found.serving_text)}")
    if found.weights is not None:
        ui.out(ui.escape(found.weights.note))


def _render_several(result) -> None:
    """Each model's needs, and the single nodes that fit them together."""
    from rich.table import Table

    from llm_atc import ui
    from llm_atc.app.plan import GIB

    for model, estimate in zip(result.names, result.estimates, strict=True):
        rest = (
            f"{estimate.kv_cache_bytes / GIB:.1f} GiB of KV cache for {estimate.max_model_len} tokens"
            if estimate.generates
            else f"{estimate.activation_bytes / GIB:.1f} GiB of activations ({estimate.task}: no KV cache)"
        )
        ui.out(f"[bold]{ui.escape(model)}[/bold]: {estimate.weight_bytes / GIB:.1f} GiB of weights + {rest}")
    if not result.options:
        ui.out(f"\nNo single node in SkyPilot's catalog ({', '.join(result.clouds)}) fits them together.")
        return
    price = "SPOT $/H" if result.use_spot else "$/H"
    table = Table(box=None, header_style="bold", title="Nodes that fit them together", title_justify="left")
    for column in ("GPUS", "GIB/GPU", "CLOUD", "INSTANCE", price, "ENGINES"):
        table.add_column(column, justify="right" if "/" in column else "left")
    for hourly, offer, layout in result.options:
        table.add_row(
            f"{offer.accelerator}:{offer.count}",
            f"{offer.gpu_memory_gib:.1f}",
            offer.cloud,
            str(offer.instance_type or "-"),
            f"{hourly:.3f}",
            ui.escape(layout.summary.removeprefix("Engines: ")),
        )
    ui.out()
    ui.out(table)
    ui.out(f"\n--accelerator auto: {','.join(result.auto)}")


def _render(result) -> None:
    from rich.table import Table

    from llm_atc import ui
    from llm_atc.app.plan import GIB, iter_terms

    estimate = result.estimate
    adapter = f", a LoRA adapter on {result.model.adapter_of}" if result.model.adapter_of else ""
    ui.out(
        f"[bold]{ui.escape(result.model.name)}[/bold] ({ui.escape(result.model.source)}{ui.escape(adapter)}), "
        f"--mode {estimate.mode}"
    )
    terms = Table(box=None, show_header=False, padding=(0, 1))
    terms.add_column(style="bold")
    terms.add_column()
    for label, text in iter_terms(estimate):
        terms.add_row(label, ui.escape(text))
    ui.out(terms)
    for note in estimate.notes:
        ui.warn(ui.escape(note))
    price = "SPOT $/H" if result.use_spot else "$/H"
    where = ", ".join(result.clouds) + (f" / {result.region}" if result.region else "")
    if not result.options:
        ui.out(f"\nNo GPU in SkyPilot's catalog ({where}) fits.")
    else:
        table = Table(box=None, header_style="bold", title=f"GPUs that fit ({where})", title_justify="left")
        for column in (
            "GPUS",
            "NODES",
            "GIB/GPU",
            "NEED/GPU",
            "CLOUD",
            "INSTANCE",
            "REGION",
            price,
            "SPOT $/H" if not result.use_spot else "$/H",
        ):
            table.add_column(column, justify="right" if "/" in column or column == "NODES" else "left")
        for option in result.options:
            offer = option.offer
            other = offer.price if result.use_spot else offer.spot_price
            table.add_row(
                option.accelerators,
                str(option.nodes),
                f"{offer.gpu_memory_gib:.1f}",
                f"{option.need_bytes / GIB:.1f}",
                offer.cloud,
                str(offer.instance_type or "-"),
                str(option.region or "-"),
                f"{option.hourly:.3f}",
                f"{other * option.nodes:.3f}" if other is not None else "-",
            )
        ui.out()
        ui.out(table)
    if result.infeasible:
        ui.out("\n[bold]Does not fit[/bold]")
        for gpu, reason in result.infeasible.items():
            ui.out(f"  {ui.escape(gpu)}: {ui.escape(reason)}")
    if result.auto:
        nodes = f" (num_nodes {result.num_nodes})" if (result.num_nodes or 1) > 1 else ""
        ui.out(f"\n--accelerator auto: {','.join(result.auto)}{nodes}")
