"""Checkpoints in S3 and GCS for the CLI: parse URIs, check, list, download and upload.

The client is the node's own (``recipes/train/buckets.py``: boto3 honours ``AWS_ENDPOINT_URL``,
google-cloud-storage ``STORAGE_EMULATOR_HOST``; both imported lazily); this module adds one-line
errors, progress bars and incremental downloads.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llm_atc import ui
from llm_atc.bucket_uri import BucketURI
from llm_atc.errors import NotFoundError, UserError, first_line
from llm_atc.recipes.train.contract import RUN_BASE

MODEL_MARKERS = ("config.json", "adapter_config.json")


@dataclass(frozen=True)
class Checkpoint:
    """What a bucket prefix holds: full weights, or a LoRA adapter on a base model."""

    uri: BucketURI
    is_adapter: bool
    base_model: str | None = None
    rank: int | None = None
    safetensors: bool = False  # the full weights (the model's, or the run's own base) are .safetensors

    @property
    def base_in_run(self) -> bool:
        """The adapter's base is the run's own copy (``<run>/base/``)."""
        return self.is_adapter and self.base_model == RUN_BASE

    @property
    def weights_uri(self) -> BucketURI | None:
        """Where the full weights are in the bucket (None: an adapter on a Hub base)."""
        if not self.is_adapter:
            return self.uri
        return self.uri.child(RUN_BASE) if self.base_in_run else None


class ObjectStore:
    """Bucket operations for the CLI: the node's own client (``recipes/train/buckets.py``), with
    SDK errors turned into one-line UserErrors."""

    def __init__(self, scheme: str):
        self.scheme = scheme

    def _bucket(self, uri: BucketURI):
        from llm_atc.recipes.train.buckets import Bucket

        return Bucket(f"{uri.scheme}://{uri.bucket}/{uri.prefix}")

    def bucket_exists(self, bucket: str) -> bool:
        with _translate_errors(self.scheme, bucket):
            return self._bucket(BucketURI(self.scheme, bucket)).exists()

    def list_objects(self, uri: BucketURI) -> Iterator[tuple[str, int, str]]:
        """``(key relative to uri.prefix, size, etag)`` for every object under the prefix."""
        with _translate_errors(self.scheme, uri.bucket):
            listing = self._bucket(uri).listing()
        for key, (size, etag) in listing.items():
            yield key, size, etag

    def list_children(self, uri: BucketURI) -> list[str]:
        """Names of the "folders" directly under the prefix."""
        with _translate_errors(self.scheme, uri.bucket):
            return self._bucket(uri).children()

    def read_text(self, uri: BucketURI) -> str:
        with _translate_errors(self.scheme, uri.bucket):
            return self._bucket(uri).read_text()

    def download(self, uri: BucketURI, dest: Path, callback: Callable[[int], None]) -> None:
        with _translate_errors(self.scheme, uri.bucket):
            self._bucket(uri).download_file("", dest, callback)

    def upload(self, path: Path, uri: BucketURI, callback: Callable[[int], None]) -> None:
        with _translate_errors(self.scheme, uri.bucket):
            self._bucket(uri).upload_file(path, "", callback)

    def create_bucket(self, bucket: str) -> None:
        with _translate_errors(self.scheme, bucket):
            self._bucket(BucketURI(self.scheme, bucket)).create()

    def delete_all(self, uri: BucketURI) -> int:
        """Delete everything under the prefix; how many objects there were."""
        with _translate_errors(self.scheme, uri.bucket):
            return self._bucket(uri).delete()


def check_checkpoint(uri: BucketURI, store: ObjectStore | None = None) -> Checkpoint:
    """Fail in one line unless ``uri`` holds a servable model or adapter."""
    store = store or ObjectStore(uri.scheme)
    if not store.bucket_exists(uri.bucket):
        raise NotFoundError(f"bucket {uri.scheme}://{uri.bucket} does not exist or is not visible to you")
    keys = [key for key, *_ in store.list_objects(uri)]
    top = {key for key in keys if "/" not in key}
    if not top:
        raise NotFoundError(f"{uri} is empty or does not exist")
    if "config.json" in top:
        return Checkpoint(uri, is_adapter=False, safetensors=any(k.endswith(".safetensors") for k in top))
    if "adapter_config.json" in top:
        config = json.loads(store.read_text(uri.child("adapter_config.json")))
        base = f"{RUN_BASE}/"
        return Checkpoint(
            uri,
            is_adapter=True,
            base_model=config.get("base_model_name_or_path"),
            rank=config.get("r"),
            safetensors=any(k.startswith(base) and k.endswith(".safetensors") for k in keys),
        )
    raise UserError(f"{uri} holds no config.json or adapter_config.json; it is not a model checkpoint")


# Settings a task passes to the node that also tell this machine's clients where the store is.
STORE_LOCATION_KEYS = frozenset(
    {
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "STORAGE_EMULATOR_HOST",
        "GOOGLE_CLOUD_PROJECT",
    }
)
STORE_ENV_KEYS = STORE_LOCATION_KEYS | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


@contextmanager
def store_env(*settings: dict[str, str]) -> Iterator[None]:
    """Use the store settings given with ``--envs``/``--secret`` for our own bucket calls too.

    The checkpoint a node reads from a MinIO or emulator endpoint is checked (and
    data uploaded) at that same endpoint, not at AWS.
    """
    chosen = {k: v for values in settings for k, v in values.items() if k in STORE_ENV_KEYS}
    saved = {k: os.environ.get(k) for k in chosen}
    os.environ.update(chosen)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class StoreUnreachable(UserError):
    """The object store could not be asked: no credentials here, or no connection to it."""


class _translate_errors:
    """Turn SDK credential/connection errors into one-line UserErrors."""

    def __init__(self, scheme: str, bucket: str):
        self.scheme, self.bucket = scheme, bucket

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, UserError):
            return False
        where = f"{self.scheme}://{self.bucket}"
        name = type(exc).__name__
        if name in ("NoCredentialsError", "DefaultCredentialsError"):
            raise StoreUnreachable(f"no credentials for {where}: {first_line(exc)}") from None
        if name in (
            "EndpointConnectionError",
            "ConnectionError",
            "ConnectTimeoutError",
            "TransportError",
            "RetryError",
        ):
            raise StoreUnreachable(f"cannot reach the object store for {where}: {first_line(exc)}") from None
        response = getattr(exc, "response", None)  # botocore's ClientError and its modelled subclasses
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        if name in ("NotFound", "NoSuchKey", "NoSuchBucket") or code in ("404", "NoSuchKey", "NoSuchBucket"):
            raise NotFoundError(f"{where}: not found ({first_line(exc)})") from None
        if name in ("ClientError", "Forbidden", "Unauthorized"):
            raise UserError(f"{where}: {first_line(exc)}") from None
        return False


@contextmanager
def _transfer_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr; yields the callback that advances it."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=ui.stderr_console(), disable=ui.is_quiet(), transient=True) as progress:
        bar = progress.add_task(description, total=total)
        yield lambda n: progress.advance(bar, n)


def download_checkpoint(uri: BucketURI, dest: Path, store: ObjectStore | None = None, *, skip: str = "") -> Path:
    """Copy everything under ``uri`` (but keys matching the glob ``skip``) into ``dest`` with a progress bar.

    Resumable and incremental: the ``.complete`` marker keeps the size and etag of
    every object; files present with the same size and etag are not fetched again,
    so an unchanged checkpoint costs one listing and a re-uploaded one is refreshed.
    Partial files are written as ``*.part`` and renamed when complete.
    """

    marker = dest / ".complete"
    store = store or ObjectStore(uri.scheme)
    objects = {
        key: [size, etag]
        for key, size, etag in store.list_objects(uri)
        if key and not key.endswith("/") and not (skip and fnmatch.fnmatchcase(key, skip))
    }
    if not objects:
        raise NotFoundError(f"{uri} is empty or does not exist")
    known = json.loads(marker.read_text()).get("objects", {}) if marker.is_file() else {}
    todo = [
        (key, size)
        for key, (size, etag) in objects.items()
        if not (
            (dest / key).is_file() and (dest / key).stat().st_size == size and known.get(key, [size, etag])[1] == etag
        )
    ]
    if not todo and marker.is_file():
        return dest
    marker.unlink(missing_ok=True)
    with _transfer_progress(f"Downloading {uri}", sum(s for _, s in todo)) as advance:
        for key, _ in todo:
            target = dest / key
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            store.download(uri.child(key), partial, advance)
            partial.replace(target)
    marker.write_text(json.dumps({"source": str(uri), "files": len(objects), "objects": objects}))
    ui.info(f"{uri}: {len(todo)} file(s) downloaded, {len(objects) - len(todo)} already in {dest}")
    return dest


def delete_prefix(uri: BucketURI, store: ObjectStore | None = None) -> int:
    """Delete everything under ``uri`` (as a folder); how many objects there were."""
    store = store or ObjectStore(uri.scheme)
    return store.delete_all(uri) if store.bucket_exists(uri.bucket) else 0


def store_settings(envs: dict[str, str]) -> dict[str, str]:
    """The settings in ``envs`` that say where the object store is (not its credentials): kept with a
    record, so later checks of its bucket go to the same endpoint."""
    return {key: value for key, value in envs.items() if key in STORE_LOCATION_KEYS}


def upload_path(path: Path, uri: BucketURI, store: ObjectStore | None = None) -> list[str]:
    """Upload a file, or a folder's files, under ``uri`` with a progress bar; returns the names."""
    store = store or ObjectStore(uri.scheme)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    names = [f.name if path.is_file() else str(f.relative_to(path)) for f in files]
    with _transfer_progress(f"Uploading to {uri}", sum(f.stat().st_size for f in files)) as advance:
        for file, name in zip(files, names, strict=True):
            store.upload(file, uri.child(name), advance)
    return names
