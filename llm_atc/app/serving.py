"""How each model of a serve is served, read from what the model carries: what it is for (chat,
embeddings, rerank, classification) and, for a generative model, vLLM's tool-call and reasoning parsers
for its family. Runs after every cheap check and before anything launches; a parser the model's tokenizer
cannot start with is refused here, not after a GPU is paid for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llm_atc import model_tasks, ui
from llm_atc.errors import UserError
from llm_atc.hub import hub_token
from llm_atc.model_files import ModelFiles, vocabulary
from llm_atc.model_tasks import AUTO, Serving
from llm_atc.models import ModelRef
from llm_atc.options import shorten
from llm_atc.planning import load_model_info
from llm_atc.spec import ServeSpec
from llm_atc.storage import store_env


@dataclass(frozen=True)
class _Read:
    """What could be read of one model: its config (None when it could not be), and why not."""

    config: dict | None
    sentence_transformers: bool = False
    adapter: bool = False
    why_not: str = ""


def resolve(spec: ServeSpec, reads: dict | None = None) -> tuple[ServeSpec, list[str]]:
    """``spec`` with how each model is served (``spec.servings``), and the lines that say so. ``reads``: what
    an earlier call read of the models, kept (and added to) so that nothing is read twice."""
    servings, notes = [], []
    reads = {} if reads is None else reads  # model -> _Read
    with store_env(spec.envs, spec.secrets), hub_token(spec.secrets):
        for model in spec.models:
            if model not in reads:
                with ui.spinner(f"Reading what {shorten(model.location)} is"):
                    reads[model] = _read(model)
            serving, lines = _serving(spec, model, reads[model])
            servings.append(serving)
            notes += lines
    resolved = replace(spec, servings=tuple(servings))
    first = servings[0]
    if not first.generates and resolved.max_loras:
        if spec.runtime_lora_asked:
            raise UserError(
                f"--max_loras/--max_lora_rank: {spec.served_name} is served for {first.task} "
                "(no LoRA adapters); drop them"
            )
        resolved = replace(resolved, max_loras=0, max_lora_rank=0)
    return resolved, notes


def _serving(spec: ServeSpec, model: ModelRef, read: _Read) -> tuple[Serving, list[str]]:
    served = spec.served_name_of(model)
    names = [model.name, model.hub_id or "", str((read.config or {}).get("_name_or_path") or "")]
    notes = [f"{served}: could not read its config.json ({read.why_not}); going by its name"] if read.why_not else []
    try:
        serving, choice, family = model_tasks.choose(
            read.config,
            names=names,
            sentence_transformers=read.sentence_transformers,
            adapter=read.adapter,
            task=spec.task,
            tool_parser=spec.tool_parser,
            reasoning_parser=spec.reasoning_parser,
        )
    except UserError as exc:
        raise UserError(str(exc).replace("the model serves", f"{served} is served for", 1)) from None
    if spec.engine == "transformers":
        if not serving.generates:
            raise UserError(
                f"{served} is served for {serving.task} ({choice.why}), which needs vLLM: "
                "transformers serve only generates text; use --engine vllm"
            )
        return Serving(), notes
    if not serving.generates:
        return serving, [*notes, f"{served}: {serving.summary()} ({choice.why})"]
    parsers = {}
    for kind in ("tool", "reasoning"):
        asked, parser = getattr(spec, f"{kind}_parser"), getattr(serving, f"{kind}_parser")
        missing = _missing_tokens(model, parser, kind) if parser else []
        if missing and asked != AUTO:
            raise UserError(
                f"--{kind}_parser {parser} needs the token{'s' if len(missing) > 1 else ''} {', '.join(missing)}, "
                f"which {served}'s tokenizer lacks, so vLLM would fail at start-up; pass another parser or none"
            )
        if missing:  # the family's parser, but this model's tokenizer cannot start it (a base model, say)
            notes.append(f"{served}: no {kind} parser: its tokenizer lacks {', '.join(missing)}, which {parser} needs")
            parser = None
        parsers[kind] = parser
    serving = replace(serving, tool_parser=parsers["tool"], reasoning_parser=parsers["reasoning"])
    if family is None and spec.tool_parser == AUTO and spec.reasoning_parser == AUTO:
        return serving, notes
    why = f"the {family.family} family" if family else "as asked"
    line = f"{served}: {serving.summary()} ({why}; --tool_parser/--reasoning_parser NAME|none change it)"
    if family and family.chat_template and serving.tool_parser and spec.tool_parser == AUTO and not spec.chat_template:
        line += f"; vLLM's docs suggest --chat_template {family.chat_template} for tool calls"
    return serving, [*notes, line]


def _read(model: ModelRef) -> _Read:
    """The model's config and sentence-transformers marker (a LoRA adapter: its base's config)."""

    try:
        info = load_model_info(model)
    except UserError as exc:
        adapter = model.path is not None and not (model.path / "config.json").is_file()
        return _Read(None, adapter=adapter, why_not=str(exc).splitlines()[0][:200])
    return _Read(info.config, info.sentence_transformers, adapter=info.adapter_of is not None)


def _missing_tokens(model: ModelRef, parser: str, kind: str) -> list[str]:
    """The tokens ``parser`` needs that the model's tokenizer lacks (vLLM refuses to start without them);
    none where the tokenizer cannot be read from here (vLLM checks it on the node)."""
    needed = model_tasks.needed_tokens(parser, kind)
    if not needed:
        return []
    try:
        found = vocabulary(ModelFiles.of(model), needed)
    except UserError:
        return []
    return [] if found is None else [token for token in needed if token not in found]
