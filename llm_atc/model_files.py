"""Small files a model carries (its config, sentence-transformers markers, tokenizer files), read where
the model is: a folder here, a bucket folder, or a Hugging Face Hub repository (its cache answers
offline). What serving needs to know before launching: what the model is for, and whether its tokenizer
has the tokens a vLLM parser looks for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from llm_atc.errors import NotFoundError, UserError
from llm_atc.hub import hub_file
from llm_atc.model_tasks import SENTENCE_TRANSFORMERS_FILES
from llm_atc.storage import RUN_BASE

if TYPE_CHECKING:
    from llm_atc.models import ModelRef
    from llm_atc.storage import BucketURI, ObjectStore

ADAPTER_CONFIG = "adapter_config.json"


class ModelFiles:
    """Reads a model's small files. ``text(name)`` is None where the model has no such file; a place
    that cannot be read raises a one-line :class:`UserError`."""

    def __init__(
        self,
        *,
        folder: Path | None = None,
        bucket: BucketURI | None = None,
        hub_id: str | None = None,
        store: ObjectStore | None = None,
    ):
        self.folder, self.bucket, self.hub_id, self._store = folder, bucket, hub_id, store

    @classmethod
    def of(cls, ref: ModelRef, store: ObjectStore | None = None) -> ModelFiles:
        return cls(folder=ref.path, bucket=ref.bucket, hub_id=ref.hub_id, store=store)

    @property
    def where(self) -> str:
        return str(self.folder or self.bucket or self.hub_id)

    def text(self, name: str) -> str | None:
        if self.folder is not None:
            path = self.folder / name
            return path.read_text(errors="replace") if path.is_file() else None
        if self.bucket is not None:
            from llm_atc.storage import ObjectStore

            self._store = self._store or ObjectStore(self.bucket.scheme)
            try:
                return self._store.read_text(self.bucket.child(name))
            except NotFoundError:
                return None

        path = hub_file(self.hub_id or "", name, missing_ok=True)
        return Path(path).read_text(errors="replace") if path else None

    def json(self, name: str) -> dict | None:
        text = self.text(name)
        if text is None:
            return None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{self.where}/{name} is not valid JSON: {exc}") from None
        return data if isinstance(data, dict) else None

    def base(self) -> ModelFiles | None:
        """A LoRA adapter's base model (None for a full model, or a base that is not a folder or Hub id)."""
        adapter = self.json(ADAPTER_CONFIG) if self.text("config.json") is None else None
        base = str((adapter or {}).get("base_model_name_or_path") or "")
        if not base:
            return None

        if base == RUN_BASE:  # an adapter run that carries its base
            if self.folder is not None:
                return ModelFiles(folder=self.folder / RUN_BASE)
            if self.bucket is not None:
                return ModelFiles(bucket=self.bucket.child(RUN_BASE), store=self._store)
            return None
        path = Path(base).expanduser()
        return ModelFiles(folder=path) if path.is_dir() else ModelFiles(hub_id=base)


def vocabulary(files: ModelFiles, wanted: tuple[str, ...]) -> frozenset[str] | None:
    """The tokens of ``wanted`` that the tokenizer has as single tokens (its vocabulary and added tokens, as
    vLLM's ``get_vocab()`` sees them); None when the model carries no tokenizer files to read. The small
    ``tokenizer_config.json`` is read first, ``tokenizer.json`` only when it leaves some unanswered."""
    found: set[str] = set()
    config = files.json("tokenizer_config.json")
    if config is not None:
        for entry in (config.get("added_tokens_decoder") or {}).values():
            if isinstance(entry, dict) and entry.get("content") in wanted:
                found.add(entry["content"])
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        found.update(t for t in extra if isinstance(t, str) and t in wanted)
    if found >= set(wanted):
        return frozenset(found)
    tokenizer = files.json("tokenizer.json")
    if tokenizer is None:  # no vocabulary to look in (a SentencePiece or tiktoken tokenizer, or an adapter)
        base = files.base() if config is None else None
        return vocabulary(base, wanted) if base is not None else None
    found.update(t["content"] for t in tokenizer.get("added_tokens") or [] if t.get("content") in wanted)
    vocab = (tokenizer.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, dict):
        found.update(t for t in wanted if t in vocab)
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        pieces = {row[0] for row in vocab if isinstance(row, list) and row}
        found.update(t for t in wanted if t in pieces)
    return frozenset(found)


def has_sentence_transformers(files: ModelFiles) -> bool:
    """Whether the model carries sentence-transformers' files (an embedding model)."""

    return any(files.text(name) is not None for name in SENTENCE_TRANSFORMERS_FILES)
