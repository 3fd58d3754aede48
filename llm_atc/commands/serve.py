"""llm-atc serve: an OpenAI-compatible endpoint for a model, on a cloud or this machine."""

from __future__ import annotations

import click

from llm_atc.commands._options import env_options, launch_options, lifetime_options, placement_options, sectioned
from llm_atc.engine_rule import ENGINE_AUTO_RULE

HELP_SECTIONS = (
    ("What to serve", ("name", "source", "alias", "task", "lora", "chat_template", "eos_token", "tool_parser",
                       "reasoning_parser")),
    ("Where it runs", ("cloud", "region", "zone", "cluster", "accelerator", "cpus", "memory", "use_spot", "disk_size",
                       "num_nodes")),
    ("Engine", ("engine", "max_model_len", "dtype", "quantization", "vllm_args", "weights", "cache_weights",
                "max_loras", "max_lora_rank", "port")),
    ("Scaling (a SkyServe service)", ("replicas", "target_qps", "ondemand_fallback", "dynamic_ondemand_fallback")),
    ("Lifetime and cost", ("idle_minutes", "max_hours", "price_per_hour")),
    ("Security", ("no_auth", "open_port", "tls_cert", "tls_key", "envs", "secret")),
    ("Launching", ("timeout", "keep_on_failure", "detach_setup", "detach_run", "no_setup", "yes", "dryrun", "help")),
)  # fmt: skip


@click.command(cls=sectioned(*HELP_SECTIONS))
@click.option(
    "-n",
    "--name",
    multiple=True,
    help="Model: a Hugging Face id, llm-atc/<run> (a checkpoint we trained) or a local folder. Required, "
    "except with --cloud local, where it defaults to a built-in demo model.",
)
@click.option("--source", help="s3:// or gs:// URI of the checkpoint to serve under --name (wins over the registry).")
@click.option(
    "--alias",
    multiple=True,
    metavar="NAME",
    help="Also answer to NAME as `model` (vLLM; repeatable), e.g. the name your clients already send.",
)
@placement_options(
    accelerator_default=None,
    accelerator_help="GPUs: NAME[:COUNT] such as A100-80GB:2, a comma list meaning any of them, or "
    "auto. Default: A100:1 for vLLM, none for transformers.",
)
@env_options()
@click.option("--max_model_len", type=int, help="Context length the engine allocates for.")
@click.option("--dtype", help="Weights dtype: auto, half, float16, bfloat16, float32.")
@click.option("--quantization", help="vLLM quantization method, e.g. awq, gptq, fp8.")
@click.option(
    "--lora",
    multiple=True,
    metavar="NAME=REF",
    help="Also serve a LoRA adapter under NAME (vLLM): REF is llm-atc/<run>, s3:// or gs://, a folder "
    "or a Hub id. Repeatable.",
)
@click.option(
    "--chat_template",
    metavar="FILE|TEMPLATE",
    help="Jinja chat template (a file, or the template text) for models whose repo has none (vLLM).",
)
@click.option(
    "--eos_token",
    metavar="TOKEN",
    help="A token that also ends generation, e.g. '<|im_end|>' (vLLM; for models whose config misses it).",
)
@click.option(
    "--task",
    type=click.Choice(["auto", "generate", "embed", "rerank", "classify"]),
    default="auto",
    show_default=True,
    help="What the model serves: chat and completions (generate), /v1/embeddings (embed), /v1/rerank and "
    "/v1/score (rerank), /classify (classify). auto: what its config.json says (vLLM).",
)
@click.option(
    "--tool_parser",
    metavar="auto|none|NAME",
    default="auto",
    show_default=True,
    help="vLLM's tool-call parser, for `tools` and `tool_choice` requests. auto: the one vLLM's docs give for "
    "the model's family (e.g. hermes for Qwen2.5 and Qwen3, llama3_json for Llama 3.1).",
)
@click.option(
    "--reasoning_parser",
    metavar="auto|none|NAME",
    default="auto",
    show_default=True,
    help="vLLM's reasoning parser: the model's thinking comes back apart, as `reasoning`. auto: the one for the "
    "model's family (e.g. qwen3, deepseek_r1 for R1 distills).",
)
@click.option("--vllm_args", metavar="'FLAGS'", help='Extra vLLM engine flags, e.g. "--enable-prefix-caching".')
@click.option(
    "--engine",
    type=click.Choice(["auto", "vllm", "transformers"]),
    default="auto",
    show_default=True,
    help=f"Serving engine. auto: {ENGINE_AUTO_RULE}. transformers runs on CPUs (small models, CPU-only clusters).",
)
@click.option(
    "--port",
    type=int,
    default=8000,
    show_default=True,
    help="Engine port on the node (0 picks a free one, local only).",
)
@click.option(
    "--cache_weights",
    metavar="s3://...|gs://...",
    help="Stage a Hub model's weights in this bucket folder once; later replicas stream them from it (vLLM).",
)
@click.option(
    "--max_loras",
    type=int,
    help="Runtime LoRA: adapters active at once that `llm-atc adapters add` can load into the running "
    "server (vLLM; default 4, 0 turns runtime loading off).",
)
@click.option(
    "--max_lora_rank",
    type=int,
    help="Runtime LoRA: the highest adapter rank the server accepts (default 64; 8, 16, 32, 64, 128, 256, 320, 512).",
)
@click.option(
    "--weights",
    type=click.Choice(["auto", "stream", "copy"]),
    default="auto",
    show_default=True,
    help="How weights in a bucket (llm-atc/<run>, --source, --cache_weights) reach vLLM. stream: straight from "
    "the bucket (Run:ai model streamer, safetensors); copy: to the node's disk first; auto: stream where it works.",
)
@click.option(
    "--num_nodes",
    type=int,
    default=1,
    show_default=True,
    help="Nodes for one vLLM: tensor parallel within a node, pipeline parallel across nodes (Ray).",
)
@click.option(
    "--replicas",
    metavar="N|MIN..MAX",
    help="Run a SkyServe service with N replicas, or autoscale between MIN (0: scale to zero) and MAX.",
)
@click.option("--target_qps", type=float, help="Requests per second per replica that autoscaling aims for.")
@click.option(
    "--ondemand_fallback", type=int, metavar="N", help="With --use_spot: keep N replicas on on-demand instances."
)
@click.option(
    "--dynamic_ondemand_fallback",
    is_flag=True,
    help="With --use_spot: replace preempted spot replicas with on-demand ones until spot returns.",
)
@click.option(
    "--no_auth",
    is_flag=True,
    help="Serve without an API key (by default vLLM on a cluster gets one; see endpoint --show_key).",
)
@click.option(
    "--keep_on_failure", is_flag=True, help="Leave the cluster up when the engine fails to start (default: torn down)."
)
@click.option(
    "--open_port",
    is_flag=True,
    help="Open the port even though the endpoint has no API key (transformers, --no_auth); by default it stays "
    "private, reached with `llm-atc endpoint NAME --forward`.",
)
@click.option("--tls_cert", metavar="FILE", help="HTTPS: the certificate (PEM) vLLM serves; goes with --tls_key.")
@click.option("--tls_key", metavar="FILE", help="HTTPS: the certificate's private key (PEM).")
@click.option(
    "--timeout", type=float, help="Seconds to wait for readiness, 1 to 86400 (default 1800 on a cloud, 600 locally)."
)
@lifetime_options(serving=True)
@launch_options()
def serve(**options):
    """Serve a model behind vLLM's OpenAI-compatible server and print the endpoint.

    \b
    Examples:
      llm-atc serve --name lmsys/vicuna-13b-v1.3 --accelerator A100-80GB:1 --cloud gcp --envs HF_TOKEN
      llm-atc serve --name llm-atc/my-run --source s3://my-bucket/llm-atc/my-run --accelerator L4:1
      llm-atc serve --name Qwen/Qwen2.5-0.5B-Instruct --cloud local
      llm-atc serve --name Qwen/Qwen3-8B --name BAAI/bge-m3 --accelerator L4:1 --cloud gcp  # chat + embeddings
      llm-atc serve --name llm-atc/my-run --accelerator L4:1 --replicas 0..4 --target_qps 2 --use_spot
      llm-atc serve --name ./small-model --cloud slurm --region mycluster --engine transformers --cpus 4
    """
    from llm_atc import ui
    from llm_atc.app import launch
    from llm_atc.app.cost import Price, confirmation
    from llm_atc.app.serve import build_spec, prepare
    from llm_atc.readiness import snippets
    from llm_atc.registry import Registry

    dryrun, yes = options.pop("dryrun"), options.pop("yes")
    options["secrets"] = options.pop("secret")
    registry = Registry()
    spec = build_spec(**options, registry=registry)
    if spec.is_local and dryrun:
        raise click.UsageError("--dryrun renders a SkyPilot task; it does not apply to --cloud local")
    prepared = prepare(spec, registry=registry)
    for note in prepared.notes:
        ui.info(note)
    if dryrun:
        ui.raw_out(prepared.yaml)
        return
    if not spec.is_local:
        where = spec.placement.infra or "the cheapest infra SkyPilot finds"
        question = f"Launch {spec.served_text} on cluster {spec.cluster} ({spec.placement.resources_text}, {where})"
        if spec.replicas is not None:
            question = (
                f"Start service {spec.cluster} for {spec.served_text} ({spec.replicas.text}, "
                f"{spec.placement.resources_text} each, {where})"
            )
        price = prepared.workload.record.details["price"]
        if not ui.confirm(f"{question}{confirmation(Price(**price), spec.limits)}?", yes=yes):
            raise SystemExit(ui.NOT_CONFIRMED)
    try:
        record = launch.serve(prepared, registry=registry)
    except launch.Interrupted as exc:
        if spec.is_local:
            ui.info(f"Stopped {spec.cluster}: its engine ended with the interruption, nothing is left running.")
            raise
        ui.info(launch.still_up_message(spec.cluster))
        raise SystemExit(128 + exc.signum) from None
    if spec.detach_run:
        ui.info(f"Submitted; the engine is starting on {spec.cluster}.")
        ui.out(launch.still_up_message(spec.cluster))
        return
    if record.details.get("private"):
        ui.out(f"Private endpoint (no port opened): llm-atc endpoint {spec.cluster} --forward")
        return
    cafile = record.details.get("tls_cert")
    key_for = spec.cluster if prepared.api_key else None
    ui.out(
        snippets(
            record.endpoint, record.name, record.engine or "vllm", task=record.task_of(), key_for=key_for, cafile=cafile
        )
    )
    if len(record.served) > 1:
        from llm_atc.model_tasks import ENDPOINT_TEXT

        models = ", ".join(f"{name} ({ENDPOINT_TEXT[record.task_of(name)]})" for name in record.served)
        ui.out(f"Models behind this endpoint (send one as `model`): {models}")
    if not record.details.get("open_ports", True) and not spec.is_local:
        ui.info(
            f"{spec.placement.cloud} opens no ports: {record.endpoint} is the node's own address. Where that "
            f"is unreachable, tunnel to it with: llm-atc endpoint {spec.cluster} --forward"
        )
