"""``plan``: the models resolved as ``serve`` resolves them, sized, and priced against SkyPilot's catalog."""

from __future__ import annotations

from dataclasses import dataclass

from llm_atc import model_tasks
from llm_atc.app.lifecycle import refresh_runs
from llm_atc.app.resolve import resolve_model
from llm_atc.models import ModelRef
from llm_atc.planning import GIB, colocate, iter_terms
from llm_atc.planning.colocate import JointPlan
from llm_atc.planning.model_info import ModelInfo
from llm_atc.planning.plan import Plan, make_plan
from llm_atc.registry import Registry
from llm_atc.spec import check_no_adapters, check_several
from llm_atc.storage import check_checkpoint
from llm_atc.weights import LoadPath, load_path

__all__ = ["GIB", "ModelPlan", "iter_terms", "plan_model", "plan_models"]  # (GIB, iter_terms: for display)


@dataclass(frozen=True)
class ModelPlan:
    """One model's plan, and for ``--mode serve`` how ``serve`` would start it."""

    plan: Plan
    weights: LoadPath | None = None  # how `serve --weights auto` gets weights kept in a bucket
    serving: dict | None = None  # the task and parsers vLLM gets (JSON)
    serving_text: str = ""  # the same, as a line


def plan_model(
    name: str, source: str | None = None, *, mode: str = "serve", task: str = "auto", registry=None, **options
) -> ModelPlan:
    """Size ``name`` for ``mode`` (``task``: serve's) and price every GPU type that fits it (``options``:
    make_plan's)."""
    model = _model(name, source, registry or Registry())
    plan = make_plan(model, mode=mode, task=None if task == "auto" else task, **options)
    if mode != "serve":
        return ModelPlan(plan)
    weights = load_path(check_checkpoint(model.bucket)) if model.bucket is not None else None
    serving, text = _serves(plan.model, task)
    return ModelPlan(plan, weights, serving, text)


def plan_models(names, *, registry=None, **options) -> JointPlan:
    """Several models on one node: where each engine goes on each GPU type that fits them all."""
    check_several(list(names), engine="vllm", given={})  # as serve checks them: each once, at most so many
    registry = registry or Registry()
    models = tuple(_model(name, None, registry) for name in names)
    check_no_adapters(models)
    return colocate.make_plan(models, **options)


def _model(name: str, source: str | None, registry: Registry) -> ModelRef:
    """``--name``/``--source`` resolved as ``serve`` resolves them (a training run asked first how it is)."""
    if source is None:
        refresh_runs([name], registry)
    return resolve_model(name, source, registry)


def _serves(info: ModelInfo, task: str) -> tuple[dict, str]:
    """What `serve` would start vLLM for (the task and the parsers of the model's family): JSON and a line."""
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
