"""``s3://`` (boto3) and ``gs://`` (google-cloud-storage) for the code that runs on the node.

Used by ``finetune.py`` (data, checkpoints, the trained model) and by the serving recipes
(``MODEL_SOURCE``: weights fetched by the node itself, on infra where SkyPilot cannot
mount buckets). Honours ``AWS_ENDPOINT_URL`` (S3-compatible stores such as MinIO) and
``STORAGE_EMULATOR_HOST``. Only the standard library is imported at module level.

    python3 buckets.py fetch s3://bucket/llm-atc/my-run ~/llm-atc/model
    python3 buckets.py stage Qwen/Qwen2.5-7B-Instruct s3://bucket/llm-atc/weights ~/llm-atc/model
"""

from __future__ import annotations

import os
import sys
from pathlib import Path



def is_bucket_uri(uri: str) -> bool:
    return uri.startswith(("s3://", "gs://"))


class Bucket:
    """``s3://bucket/prefix`` or ``gs://bucket/prefix``: the few operations training needs."""

    def __init__(self, uri: str):
        scheme, _, rest = uri.partition("://")
        self.scheme = scheme
        self.bucket, _, prefix = rest.partition("/")
        self.prefix = prefix.strip("/")
        if not self.bucket:
            raise SystemExit(f"llm-atc: {uri!r} names no bucket")
        self._client = None

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")

    def child(self, *parts: str) -> "Bucket":
        return Bucket(f"{self.scheme}://{self.bucket}/" + "/".join(p.strip("/") for p in (self.prefix, *parts) if p))

    @property
    def client(self):
        if self._client is None:
            if self.scheme == "s3":
                import boto3

                self._client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
            else:
                from google.cloud import storage

                if os.environ.get("STORAGE_EMULATOR_HOST"):
                    from google.auth.credentials import AnonymousCredentials

                    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or "llm-atc-local"
                    self._client = storage.Client(project=project, credentials=AnonymousCredentials())
                else:
                    self._client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None)
        return self._client

    def _key(self, relative: str = "") -> str:
        return "/".join(p for p in (self.prefix, relative.strip("/")) if p)

    def objects(self) -> dict[str, int]:
        """Every object under the prefix (as a folder): its key relative to the prefix -> its size."""
        folder = self._key() + "/" if self.prefix else ""
        if self.scheme == "s3":
            sizes = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
                sizes.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
        else:
            sizes = {blob.name: blob.size for blob in self.client.list_blobs(self.bucket, prefix=folder)}
        return {key[len(folder):]: size for key, size in sizes.items() if not key.endswith("/")}

    def list(self) -> list[str]:
        """Keys under the prefix (as a folder), relative to it."""
        return list(self.objects())

    def download_file(self, relative: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        key = self._key(relative)
        if self.scheme == "s3":
            self.client.download_file(self.bucket, key, str(dest))
        else:
            self.client.bucket(self.bucket).blob(key).download_to_filename(str(dest))

    def upload_file(self, path: Path, relative: str) -> None:
        key = self._key(relative)
        if self.scheme == "s3":
            self.client.upload_file(str(path), self.bucket, key)
        else:
            self.client.bucket(self.bucket).blob(key).upload_from_filename(str(path))

    def download_folder(self, dest: Path, *, skip_same_size: bool = False) -> int:
        """Download everything under the prefix into ``dest``; returns how many files were fetched.

        ``skip_same_size``: keep files already in ``dest`` with the object's size (an
        interrupted or repeated fetch resumes instead of starting over).
        """
        fetched = 0
        for relative, size in sorted(self.objects().items()):
            target = dest / relative
            if skip_same_size and target.is_file() and target.stat().st_size == size:
                continue
            partial = target.with_name(target.name + ".partial")
            self.download_file(relative, partial)
            partial.replace(target)
            fetched += 1
        return fetched

    def upload_folder(self, folder: Path, last: tuple[str, ...] = ()) -> int:
        """Upload every file under ``folder``; the names in ``last`` go after all others."""
        files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: (p.name in last, str(p)))
        for path in files:
            self.upload_file(path, path.relative_to(folder).as_posix())
        return len(files)

    def delete(self) -> int:
        """Delete everything under the prefix (as a folder)."""
        keys = [self._key(relative) for relative in self.list()]
        if self.scheme == "s3":
            for start in range(0, len(keys), 1000):
                chunk = keys[start:start + 1000]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk]})
        else:
            bucket = self.client.bucket(self.bucket)
            for key in keys:
                bucket.blob(key).delete()
        return len(keys)


def fetch(uri: str, dest: str) -> None:
    """Copy the folder ``uri`` to ``dest``, skipping files already there with the same size."""
    if not is_bucket_uri(uri):
        raise SystemExit(f"llm-atc: {uri!r} is not an s3:// or gs:// URI")
    target = Path(dest).expanduser()
    try:
        fetched = Bucket(uri).download_folder(target, skip_same_size=True)
    except Exception as exc:  # noqa: BLE001 - one clear line for any SDK error
        raise SystemExit(f"llm-atc: cannot fetch {uri}: {type(exc).__name__}: {exc}") from None
    if not target.is_dir() or not any(target.iterdir()):
        raise SystemExit(f"llm-atc: {uri} is empty")
    print(f"llm-atc: {uri} -> {target} ({fetched} files fetched)", flush=True)


STAGED_MARKER = ".llm-atc-staged"  # written last: the cached copy is complete


def stage(hub_id: str, cache: str, dest: str) -> None:
    """Weights of Hub model ``hub_id`` in ``dest``, through the bucket cache ``cache``.

    The first replica downloads from the Hub and uploads to ``<cache>/<hub_id>/`` (the
    marker last); later replicas copy from the bucket, without the Hub.
    """
    if not is_bucket_uri(cache):
        raise SystemExit(f"llm-atc: {cache!r} is not an s3:// or gs:// URI")
    cached = Bucket(cache).child(hub_id)
    target = Path(dest).expanduser()
    try:
        if STAGED_MARKER in cached.list():
            count = cached.download_folder(target, skip_same_size=True)
            (target / STAGED_MARKER).unlink(missing_ok=True)
            print(f"llm-atc: {hub_id} from the weights cache {cached} ({count} files fetched)", flush=True)
            return
        from huggingface_hub import snapshot_download

        print(f"llm-atc: {hub_id} is not in the weights cache yet: downloading it from the Hub", flush=True)
        snapshot_download(hub_id, local_dir=str(target), token=os.environ.get("HF_TOKEN") or None)
        marker = target / STAGED_MARKER
        marker.write_text(hub_id)
        count = cached.upload_folder(target, last=(STAGED_MARKER,))
        marker.unlink()
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - one clear line for any SDK error
        raise SystemExit(f"llm-atc: cannot stage {hub_id} through {cached}: {type(exc).__name__}: {exc}") from None
    print(f"llm-atc: {hub_id} cached at {cached} ({count} files) for the next replicas", flush=True)


USAGE = """usage: python3 buckets.py fetch s3://BUCKET/PREFIX DEST
       python3 buckets.py stage HUB_ID s3://BUCKET/PREFIX DEST"""

if __name__ == "__main__":
    commands = {"fetch": (fetch, 2), "stage": (stage, 3)}
    command, arity = commands.get(sys.argv[1] if len(sys.argv) > 1 else "", (None, -1))
    if command is None or len(sys.argv) - 2 != arity:
        raise SystemExit(USAGE)
    command(*sys.argv[2:])
