"""Reading a model's config (``config.json`` and the safetensors index) from the Hub, a folder or a bucket."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llm_atc.errors import NotFoundError, UserError
from llm_atc.hub import hub_file
from llm_atc.model_files import ModelFiles, has_sentence_transformers
from llm_atc.model_tasks import GENERATE, detect_task
from llm_atc.storage import RUN_BASE

if TYPE_CHECKING:
    from llm_atc.models import ModelRef
    from llm_atc.storage import BucketURI, ObjectStore


@dataclass(frozen=True)
class ModelInfo:
    """A model's ``config.json`` and, when published, its safetensors index size."""

    name: str
    config: dict
    source: str  # where it was read: "Hugging Face Hub", a folder, a bucket URI
    index_total_size: int | None = None  # ``metadata.total_size`` of model.safetensors.index.json
    adapter_of: str | None = None  # a LoRA adapter's base model (the config is the base's)
    sentence_transformers: bool = False  # it carries sentence-transformers' files: an embedding model

    @property
    def task(self) -> str:
        """What the model is served for (``llm_atc.model_tasks``): a LoRA adapter generates."""

        if self.adapter_of:
            return GENERATE
        return detect_task(self.config, sentence_transformers=self.sentence_transformers).task

    @classmethod
    def from_config(
        cls, config: Mapping, *, name: str | None = None, index_total_size: int | None = None, source: str = "config"
    ) -> ModelInfo:
        return cls(name or str(config.get("_name_or_path") or "model"), dict(config), source, index_total_size)


def load_model_info(
    model: str | ModelRef | ModelInfo | Mapping,
    *,
    source: str | None = None,
    store: ObjectStore | None = None,
) -> ModelInfo:
    """Read the config of ``model``: a Hub id, ``llm-atc/<run>``, a folder, a :class:`ModelRef`,
    or an already-read config dict / :class:`ModelInfo` (returned as is)."""
    if isinstance(model, ModelInfo):
        return model
    if isinstance(model, Mapping):
        return ModelInfo.from_config(model)
    from llm_atc.models import ModelRef, parse_model

    ref = model if isinstance(model, ModelRef) else parse_model(model, source)
    if ref.path is not None:
        return _from_folder(ref.name, Path(ref.path))
    if ref.bucket is not None:
        return _from_bucket(ref.name, ref.bucket, store)
    return _from_hub(ref.hub_id or ref.name)


def _parse_json(text: str, where: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where} does not hold a JSON object")
    return data


def _index_size(index: dict | None) -> int | None:
    size = ((index or {}).get("metadata") or {}).get("total_size")
    try:
        return int(size) if size else None
    except (TypeError, ValueError):
        return None


def _adapter_base(adapter: dict, where: str) -> str:
    base = adapter.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{where} names no base_model_name_or_path, so the base model cannot be sized")
    return str(base)


def _from_folder(name: str, folder: Path) -> ModelInfo:
    if not folder.is_dir():
        raise NotFoundError(f"--name {name!r}: no such folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        adapter_path = folder / "adapter_config.json"
        if adapter_path.is_file():
            base = _adapter_base(_parse_json(adapter_path.read_text(), str(adapter_path)), str(adapter_path))
            if base == RUN_BASE:  # an adapter run that carries its base
                base = str(folder / RUN_BASE)
            info = load_model_info(str(Path(base).expanduser()) if Path(base).expanduser().is_dir() else base)
            return ModelInfo(info.name, info.config, info.source, info.index_total_size, adapter_of=info.name)
        raise UserError(f"--name {name!r}: the folder holds no config.json or adapter_config.json")
    config = _parse_json(config_path.read_text(), str(config_path))
    index_path = folder / "model.safetensors.index.json"
    index = _parse_json(index_path.read_text(), str(index_path)) if index_path.is_file() else None
    st = has_sentence_transformers(ModelFiles(folder=folder))
    return ModelInfo(name, config, f"folder {folder}", _index_size(index), sentence_transformers=st)


def _from_bucket(name: str, uri: BucketURI, store: ObjectStore | None) -> ModelInfo:
    from llm_atc.storage import ObjectStore

    store = store or ObjectStore(uri.scheme)
    try:
        config = _parse_json(store.read_text(uri.child("config.json")), f"{uri}/config.json")
    except NotFoundError:
        try:
            adapter = _parse_json(store.read_text(uri.child("adapter_config.json")), f"{uri}/adapter_config.json")
        except NotFoundError:
            raise NotFoundError(f"{uri} holds no config.json or adapter_config.json") from None
        base = _adapter_base(adapter, f"{uri}/adapter_config.json")
        info = _from_bucket(name, uri.child(RUN_BASE), store) if base == RUN_BASE else load_model_info(base)
        return ModelInfo(info.name, info.config, info.source, info.index_total_size, adapter_of=info.name)
    try:
        index = _parse_json(store.read_text(uri.child("model.safetensors.index.json")), f"{uri}/index")
    except (NotFoundError, UserError):
        index = None
    st = has_sentence_transformers(ModelFiles(bucket=uri, store=store))
    return ModelInfo(name, config, str(uri), _index_size(index), sentence_transformers=st)


def _from_hub(repo_id: str) -> ModelInfo:
    config = _hub_json(repo_id, "config.json")
    try:
        index = _hub_json(repo_id, "model.safetensors.index.json")
    except UserError:
        index = None  # single-file checkpoints have no index; the config alone is enough
    st = has_sentence_transformers(ModelFiles(hub_id=repo_id))
    return ModelInfo(repo_id, config, "Hugging Face Hub", _index_size(index), sentence_transformers=st)


def _hub_json(repo_id: str, filename: str) -> dict:
    path = hub_file(repo_id, filename)
    if path is None:  # (hub_file answers None only when told a missing file is fine)
        raise NotFoundError(f"{repo_id} has no {filename}")
    return _parse_json(Path(path).read_text(), f"{repo_id}/{filename}")
