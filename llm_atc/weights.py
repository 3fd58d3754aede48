"""How weights kept in a bucket reach vLLM: streamed, or copied to disk first.

Streaming is vLLM's ``--load-format runai_streamer``: Run:ai's model streamer reads the
safetensors of an ``s3://``/``gs://`` folder with ranged reads straight into the engine, and only
the small files (config, tokenizer) land on disk. Copying is the recipe's fetch (or SkyPilot's
COPY mount) before vLLM starts. ``--weights auto`` streams wherever streaming works.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_atc.errors import UserError

CHOICES = ("auto", "stream", "copy")
STREAM_LOAD_FORMAT = "runai_streamer"


@dataclass(frozen=True)
class LoadPath:
    """Which way the weights go, and the line that tells the user."""

    stream: bool
    note: str


def check_choice(choice: str, *, engine: str, cache_weights: str | None) -> None:
    """Refuse ``--weights`` values that cannot apply, before any model is looked up."""
    if choice not in CHOICES:
        raise UserError(f"--weights {choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "stream" and engine == "transformers":
        raise UserError("--weights stream needs vLLM: transformers serve loads weights from disk only")


def check_source(choice: str, *, model, cache_weights: str | None) -> None:
    """``--weights stream`` needs weights in a bucket: the model's own, or the ``--cache_weights`` copy."""
    if choice == "stream" and model.bucket is None and not cache_weights:
        raise UserError(
            "--weights stream reads the weights from a bucket: serve llm-atc/<run>, --source s3://|gs://..., "
            "or a Hub model with --cache_weights"
        )


def for_serve(spec, checkpoint, *, onto: str = "the node") -> LoadPath | None:
    """The way ``spec``'s weights go (``checkpoint``: what its bucket holds); None when no bucket is
    involved. ``onto``: where a copy goes, for the note."""
    if spec.model.bucket is not None:
        return load_path(checkpoint, choice=spec.weights, engine=spec.engine, onto=onto)
    if not spec.cache_weights:
        return None
    hub_id, cache = spec.model.hub_id, spec.cache_weights
    if spec.weights == "copy":
        return LoadPath(False, f"Weights: replicas copy {hub_id} from {cache} to their disk (--weights copy).")
    return LoadPath(
        True, f"Weights: the first replica stages {hub_id} in {cache}; later ones stream it from there into vLLM."
    )


def load_path(checkpoint, *, choice: str = "auto", engine: str = "vllm", onto: str = "the node") -> LoadPath:
    """The way a bucket ``checkpoint``'s weights go with ``--weights choice``; raises UserError for
    ``stream`` where streaming cannot work."""
    copied = f"Weights: copied from {checkpoint.uri} to {onto} before the engine starts"
    why_not = _why_not_stream(checkpoint, engine)
    if why_not and choice == "stream":
        raise UserError(f"--weights stream: {why_not}")
    if why_not:
        return LoadPath(False, f"{copied} ({why_not}).")
    if choice == "copy":
        return LoadPath(False, f"{copied} (--weights copy).")
    return LoadPath(
        True,
        f"Weights: streamed from {checkpoint.weights_uri} into vLLM (Run:ai model streamer), not copied to disk first.",
    )


def _why_not_stream(checkpoint, engine: str) -> str:
    """Why these weights cannot be streamed; empty when they can."""
    if engine != "vllm":
        return "transformers serve cannot stream from a bucket"
    if checkpoint.weights_uri is None:
        return f"a LoRA adapter on {checkpoint.base_model}, which vLLM loads from the Hub"
    if not checkpoint.safetensors:
        return "its weights are not .safetensors, which the streamer reads"
    return ""
