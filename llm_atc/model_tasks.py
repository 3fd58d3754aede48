"""What a model is served for, and how vLLM must be started for it: pure functions of what the model
carries (``config.json``, sentence-transformers files, the tokenizer's vocabulary) and of its name.

- The task: ``generate`` (chat and completions), ``embed`` (``/v1/embeddings``), ``rerank``
  (``/v1/rerank`` and ``/v1/score``, a one-label cross-encoder) or ``classify`` (``/classify``).
- For generative models, vLLM's tool-call and reasoning parsers, from a table of model families
  (``data/vllm-parsers.json``, written by ``scripts/vllm_parsers.py`` and checked against the parser
  names the pinned vLLM registers).

Nothing here reads files or the network: :mod:`llm_atc.planning` reads what a model carries.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from llm_atc.errors import UserError

GENERATE, EMBED, RERANK, CLASSIFY = "generate", "embed", "rerank", "classify"
TASKS = (GENERATE, EMBED, RERANK, CLASSIFY)
AUTO, NONE = "auto", "none"

ENDPOINT_TEXT = {
    GENERATE: "chat and completions",
    EMBED: "embeddings",
    RERANK: "rerank and score",
    CLASSIFY: "classification",
}

# Architectures that generate text; with another task vLLM converts them (--convert embed|classify).
_GENERATIVE_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")
# Architectures without a head: encoders (BertModel, XLMRobertaModel, ...) that vLLM pools into embeddings.
_ENCODER_SUFFIX = "Model"
# sentence-transformers marks an embedding model with these files.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json")
# The name, when nothing else tells: the words embedding and reranking models are published under.
_RERANK_NAME = re.compile(r"rerank|cross-encoder|ms-marco", re.IGNORECASE)
_EMBED_NAME = re.compile(
    r"embed|sentence-t5|sentence-transformers/|(^|[/_-])(bge|e5|gte|minilm|mpnet|nomic-bert|simcse|instructor)[-_]",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TaskChoice:
    """The task a model is served for, and why (for the line ``serve`` prints)."""

    task: str
    why: str


def architecture(config: Mapping | None) -> str:
    """The first entry of ``architectures`` in ``config.json`` ("" when there is none)."""
    archs = (config or {}).get("architectures") or []
    return str(archs[0]) if isinstance(archs, list) and archs else ""


def is_generative_architecture(arch: str) -> bool:
    return arch.endswith(_GENERATIVE_SUFFIXES)


def _labels(config: Mapping) -> int:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    labels = config.get("num_labels")
    return int(labels) if isinstance(labels, int) and labels > 0 else 2  # transformers' default


def detect_task(
    config: Mapping | None, *, sentence_transformers: bool = False, names: Iterable[str] = ()
) -> TaskChoice:
    """The task ``config.json`` (with the sentence-transformers marker files) points to; the model's
    names only when there is no config to read."""
    arch = architecture(config)
    if arch.endswith("ForSequenceClassification"):
        labels = _labels(config or {})
        if labels == 1:
            return TaskChoice(RERANK, f"{arch} with one label: a cross-encoder")
        return TaskChoice(CLASSIFY, f"{arch} with {labels} labels")
    if sentence_transformers:
        return TaskChoice(EMBED, "a sentence-transformers model (modules.json)")
    if is_generative_architecture(arch):
        return TaskChoice(GENERATE, arch)
    if arch.endswith(_ENCODER_SUFFIX):
        return TaskChoice(EMBED, f"{arch}: an encoder without a language-model head")
    if arch:
        return TaskChoice(GENERATE, arch)
    for name in names:
        if _RERANK_NAME.search(name):
            return TaskChoice(RERANK, f"no config.json read; the name {name} says reranker")
        if _EMBED_NAME.search(name):
            return TaskChoice(EMBED, f"no config.json read; the name {name} says embedding model")
    return TaskChoice(GENERATE, "no config.json read; assumed a generative model")


def runner_flags(task: str, config: Mapping | None) -> list[str]:
    """vLLM's flags for serving a model of ``config`` for ``task``: the pooling runner for embeddings,
    reranking and classification, converting a generative architecture where it has to."""
    if task == GENERATE:
        return []
    flags = ["--runner", "pooling"]
    if is_generative_architecture(architecture(config)):
        flags += ["--convert", EMBED if task == EMBED else CLASSIFY]
    return flags


def check_task(value: str | None) -> str:
    """``--task``: auto or one of :data:`TASKS`."""
    if value is None or value == AUTO:
        return AUTO
    if value not in TASKS:
        raise UserError(f"--task {value[:40]}: choose one of {AUTO}, {', '.join(TASKS)}")
    return value


# --- tool-call and reasoning parsers ---------------------------------------------------------------


@lru_cache(maxsize=1)
def parser_table() -> dict:
    """``data/vllm-parsers.json``: the parser names the pinned vLLM registers, the tokens some need,
    and the model families with the parsers they use."""
    return json.loads(resources.files("llm_atc").joinpath("data/vllm-parsers.json").read_text())


@dataclass(frozen=True)
class Family:
    """A model family and the parsers vLLM's documentation gives for it."""

    family: str
    tool_parser: str | None
    reasoning_parser: str | None
    source: str
    chat_template: str | None = None  # a template vLLM's documentation recommends beyond the model's own


def _config_value(config: Mapping, dotted: str):
    value = config
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _named(pattern: str | None, names: list[str]) -> bool:
    return bool(pattern) and any(re.search(pattern, name, re.IGNORECASE) for name in names)


def _matches(entry: Mapping, config: Mapping, names: list[str]) -> bool:
    """Whether ``entry`` matches: with a config, every key it has; without one (the Hub out of reach),
    its name or the name it is guessed from."""
    if not config:
        return _named(entry.get("name") or entry.get("guess"), names)
    if entry.get("model_types") and str(config.get("model_type") or "") not in entry["model_types"]:
        return False
    if entry.get("architectures") and architecture(config) not in entry["architectures"]:
        return False
    if any(_config_value(config, key) != value for key, value in (entry.get("config") or {}).items()):
        return False
    return not entry.get("name") or _named(entry["name"], names)


def family_of(config: Mapping | None, names: Iterable[str]) -> Family | None:
    """The first family of the table that ``config`` (model type, architecture, keys) and the model's
    names match."""
    names = [n for n in names if n]
    for entry in parser_table()["families"]:
        if _matches(entry, config or {}, names):
            return Family(
                entry["family"],
                entry.get("tool_parser"),
                entry.get("reasoning_parser"),
                entry["source"],
                entry.get("chat_template"),
            )
    return None


def check_parser(value: str | None, kind: str) -> str:
    """``--tool_parser``/``--reasoning_parser``: auto, none, or a name the pinned vLLM registers
    (a one-line error with the closest names otherwise)."""
    if value is None or value in (AUTO, NONE):
        return value or AUTO
    table = parser_table()
    known = table[f"{kind}_parsers"]
    if value in known:
        return value
    option = f"--{kind}_parser"
    close = difflib.get_close_matches(value, known, n=3, cutoff=0.5)
    hint = (
        f"; did you mean {', '.join(close)}?" if close else f"; see `llm-atc serve --help` ({option} none turns it off)"
    )
    raise UserError(f"{option} {value[:40]}: vLLM {table['vllm']} has no such {kind.replace('_', ' ')} parser{hint}")


def needed_tokens(parser: str, kind: str) -> tuple[str, ...]:
    """The tokens a ``kind`` (tool or reasoning) parser looks up in the tokenizer's vocabulary when vLLM
    starts: vLLM refuses to start without them."""
    return tuple(parser_table()[f"{kind}_tokens"].get(parser, ()))


@dataclass(frozen=True)
class Serving:
    """How one model is served: what for, and the vLLM flags that follow (parsers for generative models)."""

    task: str = GENERATE
    tool_parser: str | None = None
    reasoning_parser: str | None = None
    runner: tuple[str, ...] = ()  # --runner pooling [--convert ...]

    def flags(self) -> list[str]:
        flags = list(self.runner)
        if self.tool_parser:
            flags += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_parser]
        if self.reasoning_parser:
            flags += ["--reasoning-parser", self.reasoning_parser]
        return flags

    @property
    def generates(self) -> bool:
        return self.task == GENERATE

    def summary(self) -> str:
        """``embeddings`` / ``chat and completions, tool calls (hermes), reasoning (qwen3)``."""
        parts = [ENDPOINT_TEXT[self.task]]
        if self.tool_parser:
            parts.append(f"tool calls ({self.tool_parser})")
        if self.reasoning_parser:
            parts.append(f"reasoning ({self.reasoning_parser})")
        return ", ".join(parts)

    def details(self) -> dict:
        """What the record keeps (status, endpoint --check, bench and the Python API read it)."""
        found = {"task": self.task}
        if self.tool_parser:
            found["tool_parser"] = self.tool_parser
        if self.reasoning_parser:
            found["reasoning_parser"] = self.reasoning_parser
        return found


def choose(
    config: Mapping | None,
    *,
    names: Iterable[str] = (),
    sentence_transformers: bool = False,
    adapter: bool = False,
    task: str = AUTO,
    tool_parser: str = AUTO,
    reasoning_parser: str = AUTO,
) -> tuple[Serving, TaskChoice, Family | None]:
    """How a model is served, from what it carries and what was asked (``auto`` / ``none`` / a name): the
    serving, why its task, and the family its parsers come from. A parser asked for a model that does not
    generate is a one-line error."""
    names = list(names)
    if task != AUTO:
        choice = TaskChoice(task, "--task")
    elif adapter:
        choice = TaskChoice(GENERATE, "a LoRA adapter")
    else:
        choice = detect_task(config, sentence_transformers=sentence_transformers, names=names)
    if choice.task != GENERATE:
        for flag, value in (("--tool_parser", tool_parser), ("--reasoning_parser", reasoning_parser)):
            if value not in (AUTO, NONE):
                raise UserError(f"{flag} applies to generative models; the model serves {choice.task} ({choice.why})")
        return Serving(choice.task, runner=tuple(runner_flags(choice.task, config))), choice, None
    family = family_of(config, names)

    def pick(asked: str, kind: str) -> str | None:
        if asked == NONE:
            return None
        return (getattr(family, f"{kind}_parser") if family else None) if asked == AUTO else asked

    return Serving(GENERATE, pick(tool_parser, "tool"), pick(reasoning_parser, "reasoning")), choice, family
