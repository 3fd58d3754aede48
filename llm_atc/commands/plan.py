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

    from llm_atc import planning, ui
    from llm_atc.options import check_number

    check_number(max_model_len, "--max_model_len")
    if len(name) > 1 and task != "auto":
        raise click.UsageError("--task applies to one model; several --name are each planned for what they serve")
    if len(name) > 1:
        _plan_several(name, source, mode, as_json, max_model_len=max_model_len, dtype=dtype,
                      quantization=quantization, cloud=cloud, region=region, use_spot=use_spot)  # fmt: skip
        return
    name = name[0]
    if task != "auto" and mode != "serve":
        raise click.UsageError(f"--task {task} goes with --mode serve")
    model = _model(name, source)
    result = planning.make_plan(
        model,
        mode=mode,
        task=None if task == "auto" else task,
        max_model_len=max_model_len,
        dtype=dtype,
        quantization=quantization,
        cloud=cloud,
        region=region,
        use_spot=use_spot,
    )
    path = _load_path(model) if mode == "serve" else None
    serves = _serves(result.model, task) if mode == "serve" else None
    if as_json:
        weights = {"weights": {"stream": path.stream, "note": path.note}} if path else {}
        serving = {"serving": serves[0]} if serves else {}
        ui.raw_out(json.dumps({**result.to_dict(), **weights, **serving}, indent=2) + "\n")
        return
    _render(result)
    if serves:
        ui.out(f"Serves: {ui.escape(serves[1])}")
    if path is not None:
        ui.out(ui.escape(path.note))


def _serves(info, task: str) -> tuple[dict, str]:
    """What `serve` would start vLLM for (the task and the parsers of the model's family): JSON and a line."""
    from llm_atc import model_tasks

    serving, choice, family = model_tasks.choose(
        info.config,
        names=[info.name, str(info.config.get("_name_or_path") or "")],
        sentence_transformers=info.sentence_transformers,
        adapter=info.adapter_of is not None,
        task=task,
    )
    why = f"the {family.family} family" if family else choice.why
    flags = " ".join(serving.flags())
    return (
        {**serving.details(), "family": family.family if family else None, "vllm_flags": serving.flags()},
        f"{serving.summary()} ({why})" + (f"; vLLM gets {flags}" if flags else ""),
    )


def _plan_several(names, source, mode, as_json, **options) -> None:
    """Several models on one node: where each engine goes on each GPU type that fits them all."""
    import json

    from rich.table import Table

    from llm_atc import ui
    from llm_atc.errors import UserError
    from llm_atc.planning import GIB, colocate
    from llm_atc.spec import check_no_adapters, check_serve_options

    if mode != "serve" or source:
        raise UserError("several --name plan a deployment of several models: --mode serve, without --source")
    check_serve_options(list(names), cloud="local")  # the same checks as serve's: each model once, at most so many
    models = tuple(_model(name, None) for name in names)
    check_no_adapters(models)
    result = colocate.make_plan(models, **options)
    if as_json:
        ui.raw_out(json.dumps(result.to_dict(), indent=2) + "\n")
        return
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


def _model(name: str, source: str | None):
    """``--name``/``--source`` resolved as ``serve`` resolves them (a training run asked first how it is)."""
    from llm_atc.app.lifecycle import refresh_runs
    from llm_atc.app.resolve import resolve_model
    from llm_atc.registry import Registry

    registry = Registry()
    if source is None:
        refresh_runs([name], registry)
    return resolve_model(name, source, registry)


def _load_path(model):
    """How `serve --weights auto` gets this model's weights, when they are in a bucket; else None."""
    from llm_atc.storage import check_checkpoint
    from llm_atc.weights import load_path

    return load_path(check_checkpoint(model.bucket)) if model.bucket is not None else None


def _render(result) -> None:
    from rich.table import Table

    from llm_atc import planning, ui

    estimate = result.estimate
    adapter = f", a LoRA adapter on {result.model.adapter_of}" if result.model.adapter_of else ""
    ui.out(
        f"[bold]{ui.escape(result.model.name)}[/bold] ({ui.escape(result.model.source)}{ui.escape(adapter)}), "
        f"--mode {estimate.mode}"
    )
    terms = Table(box=None, show_header=False, padding=(0, 1))
    terms.add_column(style="bold")
    terms.add_column()
    for label, text in planning.iter_terms(estimate):
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
                f"{option.need_bytes / planning.GIB:.1f}",
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
