"""What ``--name`` (and ``--source``) refer to: a Hub id, a trained run, or a local folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from llm_atc.bucket_uri import RUN_PREFIX, BucketURI
from llm_atc.errors import NotFoundError, UserError
from llm_atc.options import shorten

# The Hub's own limits: an owner and a name of at most 96 characters each.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference.

    ``name`` is what clients send as ``model`` (vLLM's ``--served-model-name``).
    Exactly one of ``hub_id``, ``bucket`` and ``path`` says where the weights are.
    """

    name: str
    hub_id: str | None = None
    bucket: BucketURI | None = None
    path: Path | None = None

    @property
    def run(self) -> str | None:
        """The run name for ``llm-atc/<run>`` references."""
        return self.name.split("/", 1)[1] if self.name.startswith(RUN_PREFIX + "/") else None

    @property
    def location(self) -> str:
        return str(self.bucket or self.path or self.hub_id)

    @property
    def folder(self) -> Path:
        """The folder of a folder reference (a ValueError for the others, which callers tell apart first)."""
        if self.path is None:
            raise ValueError(f"{self.name} is not a folder but {self.location}")
        return self.path

    @property
    def repo(self) -> str:
        """The Hub id of a Hub reference (a ValueError for the others, which callers tell apart first)."""
        if self.hub_id is None:
            raise ValueError(f"{self.name} is not on the Hugging Face Hub but at {self.location}")
        return self.hub_id


def check_run_name(run: str, *, option: str = "--name") -> str:
    if not RUN_NAME_RE.fullmatch(run):
        raise UserError(
            f"{option} {shorten(run)} is not a valid run name: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (at most 63 characters)"
        )
    return run


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long to be a path, and the like
        return False


def parse_model(name: str, source: str | None = None, *, option: str = "--name") -> ModelRef:
    """``--name``/``--source`` (or another option's model reference) as a :class:`ModelRef`, without the
    registry: a Hub id, a model folder, or weights in a bucket (``--source``). A trained run named without
    ``--source`` and the built-in demo model are for ``app.resolve.resolve_model``, which looks them up."""
    name = name.strip()
    shown = shorten(name)
    if not name:
        raise UserError(f"{option} is empty; pass a Hugging Face id, llm-atc/<run> or a model folder")
    if source:
        bucket = BucketURI.parse(source)
        if name.startswith(RUN_PREFIX + "/"):
            check_run_name(name.split("/", 1)[1], option=option)
        elif not HUB_ID_RE.fullmatch(name):
            raise UserError(f"{option} {shown} is not a valid model name to serve {source} under")
        return ModelRef(name=name, bucket=bucket)
    if name.startswith(RUN_PREFIX + "/"):
        check_run_name(name.split("/", 1)[1], option=option)
        raise NotFoundError(f"{option} {name}: pass --source s3://BUCKET/{name} (or gs://...) to say where it is")
    path = Path(name).expanduser()
    if looks_like_path(name) or is_dir(path):
        if not is_dir(path):
            raise NotFoundError(f"{option} {shown}: no such folder")
        if not any((path / marker).is_file() for marker in ("config.json", "adapter_config.json")):
            raise UserError(f"{option} {shown}: the folder holds no config.json or adapter_config.json")
        return ModelRef(name=name, path=path.resolve())
    if not HUB_ID_RE.fullmatch(name):
        raise UserError(f"{option} {shown} is not a Hugging Face model id (org/model), llm-atc/<run> or a model folder")
    return ModelRef(name=name, hub_id=name)
