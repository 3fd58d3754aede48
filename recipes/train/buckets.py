"""``s3://`` (boto3) and ``gs://`` (google-cloud-storage): llm-atc's one bucket client.

Used on the node by ``finetune.py`` (data, checkpoints, the trained model) and by the serving
recipes (``MODEL_SOURCE``: weights fetched by the node itself, on infra where SkyPilot cannot
mount buckets), and in the CLI through ``llm_atc.storage``. Honours ``AWS_ENDPOINT_URL``
(S3-compatible stores such as MinIO) and ``STORAGE_EMULATOR_HOST``. Only the standard library
is imported at module level, so the node needs nothing of llm-atc but this file.

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
    """``s3://bucket/prefix`` or ``gs://bucket/prefix``: every bucket operation llm-atc makes, on the node
    and (through ``llm_atc.storage``, which adds one-line errors and progress bars) in the CLI."""

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

    def child(self, *parts: str) -> Bucket:
        return Bucket(f"{self.scheme}://{self.bucket}/" + "/".join(p.strip("/") for p in (self.prefix, *parts) if p))

    @property
    def client(self):
        if self._client is None:
            self._client = make_client(self.scheme)
        return self._client

    def _key(self, relative: str = "") -> str:
        return "/".join(p for p in (self.prefix, relative.strip("/")) if p)

    def exists(self) -> bool:
        """Whether the bucket itself exists (and is visible with these credentials)."""
        if self.scheme == "s3":
            from botocore.exceptions import ClientError

            try:
                self.client.head_bucket(Bucket=self.bucket)
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                    return False
                raise
        return self.client.bucket(self.bucket).exists(**gcs_call())

    def create(self) -> None:
        """Create the bucket (S3: in AWS_REGION / AWS_DEFAULT_REGION, default us-east-1)."""
        if self.scheme == "s3":
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            where = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            self.client.create_bucket(Bucket=self.bucket, **where)
        else:
            self.client.create_bucket(self.bucket, **gcs_call())

    def listing(self) -> dict[str, tuple[int, str]]:
        """Every object under the prefix (as a folder): its key relative to the prefix -> (size, etag)."""
        folder = self._key() + "/" if self.prefix else ""
        found = {}
        if self.scheme == "s3":
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
                found.update(
                    {item["Key"]: (item["Size"], item.get("ETag", "").strip('"')) for item in page.get("Contents", [])}
                )
        else:
            found = {
                blob.name: (blob.size, blob.etag or blob.md5_hash or "")
                for blob in self.client.list_blobs(self.bucket, prefix=folder, **gcs_call())
            }
        return {key[len(folder) :]: value for key, value in found.items() if not key.endswith("/")}

    def objects(self) -> dict[str, int]:
        """Every object under the prefix (as a folder): its key relative to the prefix -> its size."""
        return {key: size for key, (size, _) in self.listing().items()}

    def list(self) -> list[str]:
        """Keys under the prefix (as a folder), relative to it."""
        return list(self.objects())

    def children(self) -> list[str]:
        """Names of the "folders" directly under the prefix."""
        folder = self._key() + "/" if self.prefix else ""
        if self.scheme == "s3":
            names = []
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=folder, Delimiter="/"
            )
            for page in pages:
                names += [p["Prefix"][len(folder) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            return sorted(names)
        iterator = self.client.list_blobs(self.bucket, prefix=folder, delimiter="/", **gcs_call())
        list(iterator)  # prefixes are filled in while pages are consumed
        return sorted(p[len(folder) :].rstrip("/") for p in iterator.prefixes)

    def read_text(self, relative: str = "") -> str:
        key = self._key(relative)
        if self.scheme == "s3":
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode()
        return self.client.bucket(self.bucket).blob(key).download_as_text(**gcs_call())

    def download_file(self, relative: str, dest: Path, callback=None) -> None:
        """Download one object; ``callback(n)`` is told how many bytes arrived."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        key = self._key(relative)
        if self.scheme == "s3":
            self.client.download_file(self.bucket, key, str(dest), Callback=callback)
        else:
            self.client.bucket(self.bucket).blob(key).download_to_filename(str(dest), **gcs_call(transfer=True))
            if callback:
                callback(dest.stat().st_size)

    def upload_file(self, path: Path, relative: str, callback=None) -> None:
        key = self._key(relative)
        if self.scheme == "s3":
            self.client.upload_file(str(path), self.bucket, key, Callback=callback)
        else:
            self.client.bucket(self.bucket).blob(key).upload_from_filename(str(path), **gcs_call(transfer=True))
            if callback:
                callback(path.stat().st_size)

    def download_folder(self, dest: Path, *, skip_same_size: bool = False, skip: str = "") -> int:
        """Download everything under the prefix into ``dest``; returns how many files were fetched.

        ``skip_same_size``: keep files already in ``dest`` with the object's size (an
        interrupted or repeated fetch resumes instead of starting over). ``skip``: a glob of keys
        left out (``base/*``: an adapter run's base, ``*.safetensors``: weights vLLM streams instead).
        """
        import fnmatch

        fetched = 0
        for relative, size in sorted(self.objects().items()):
            if skip and fnmatch.fnmatchcase(relative, skip):
                continue
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
        """Delete everything under the prefix (as a folder); how many objects there were."""
        keys = [self._key(relative) for relative in self.list()]
        if self.scheme == "s3":
            for start in range(0, len(keys), 1000):
                chunk = keys[start : start + 1000]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk]})
        else:
            bucket = self.client.bucket(self.bucket)
            for key in keys:
                bucket.blob(key).delete(**gcs_call())
        return len(keys)


def make_client(scheme: str):
    """A boto3 (``s3``) or google-cloud-storage (``gs``) client. boto3 honours ``AWS_ENDPOINT_URL``
    (MinIO, moto); the GCS emulator (``STORAGE_EMULATOR_HOST``) is used anonymously."""
    if scheme == "s3":
        import boto3

        return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    from google.cloud import storage

    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or None
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "llm-atc-local", credentials=AnonymousCredentials())
    return storage.Client(project=project)


def gcs_call(*, transfer: bool = False) -> dict:
    """Bounded timeouts and retries for google-cloud-storage calls (its default retries for 120 s)."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    deadline = 600.0 if transfer else 20.0
    return {"timeout": (5, deadline), "retry": DEFAULT_RETRY.with_deadline(deadline).with_timeout(deadline)}


def fetch(uri: str, dest: str, skip: str = "") -> None:
    """Copy the folder ``uri`` to ``dest`` (but keys matching the glob ``skip``), skipping files
    already there with the same size."""
    if not is_bucket_uri(uri):
        raise SystemExit(f"llm-atc: {uri!r} is not an s3:// or gs:// URI")
    target = Path(dest).expanduser()
    try:
        fetched = Bucket(uri).download_folder(target, skip_same_size=True, skip=skip)
    except Exception as exc:
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
    except Exception as exc:
        raise SystemExit(f"llm-atc: cannot stage {hub_id} through {cached}: {type(exc).__name__}: {exc}") from None
    print(f"llm-atc: {hub_id} cached at {cached} ({count} files) for the next replicas", flush=True)


def streamable(hub_id: str, cache: str) -> None:
    """Exit 0 when the weights cache holds a complete copy of ``hub_id`` in safetensors (vLLM can
    stream it from there), 1 otherwise."""
    try:
        names = Bucket(cache).child(hub_id).list()
    except Exception as exc:
        raise SystemExit(f"llm-atc: cannot list the weights cache {cache}: {type(exc).__name__}: {exc}") from None
    complete = STAGED_MARKER in names and any(name.endswith(".safetensors") for name in names)
    raise SystemExit(0 if complete else 1)


def read_manifest(uri: str) -> dict[str, dict]:
    """A service's runtime adapters, by name (``{"adapters": {name: {"uri": ...} or {"hub": ...}}}``);
    empty while it has none (no file yet)."""
    import json

    where, _, name = uri.rpartition("/")
    bucket = Bucket(where)
    if name not in bucket.list():
        return {}
    return json.loads(bucket.read_text(name)).get("adapters", {})


def adapter_folder(name: str, source: str) -> str:
    """The folder a replica keeps a service's runtime adapter in: its name and a mark of its source, so a name
    moved to another source (``llm-atc promote``) gets a copy of its own; llm-atc reads the mark back from vLLM's
    ``/v1/models`` (``root``) to tell which replicas switched."""
    import hashlib

    return f"{name.replace('/', '--')}--{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def sync_adapters(manifest: str, engine: str, dest: str) -> None:
    """Keep the engine's runtime LoRA adapters as a SkyServe service's manifest lists them, on each replica
    (``llm-atc adapters add/remove SERVICE``): adapters are fetched into ``dest`` and loaded through vLLM's
    ``/v1/load_lora_adapter``; replicas started later load them all. Runs beside the engine, until its parent
    (the engine) is gone."""
    import json
    import time
    import urllib.error
    import urllib.request

    parent, key = os.getppid(), os.environ.get("VLLM_API_KEY", "")
    poll = float(os.environ.get("LLM_ATC_ADAPTERS_POLL", "10"))
    loaded: dict[str, str] = {}  # name -> what it was loaded from

    def call(path: str, body: dict | None = None) -> tuple[int, str]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(engine.rstrip("/") + path, data=data, method="GET" if data is None else "POST")
        request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=600) as reply:
                return reply.status, reply.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, (exc.read() or b"").decode(errors="replace")

    def load(name: str, entry: dict) -> None:
        """Load ``name`` from its entry's source; a name loaded before is reloaded in place (vLLM swaps the
        weights between two steps: requests to it never fail)."""
        source = entry.get("uri") or entry.get("hub") or ""
        path = source
        if entry.get("uri"):
            path = str(Path(dest).expanduser() / adapter_folder(name, source))
            Bucket(source).download_folder(Path(path), skip_same_size=True, skip="base/*")
        body = {"lora_name": name, "lora_path": path, **({"load_inplace": True} if name in loaded else {})}
        status, text = call("/v1/load_lora_adapter", body)
        if status != 200 and "already" not in text:
            raise RuntimeError(f"vLLM did not load {name} ({status}): {text[:300]}")
        loaded[name] = source
        print(f"llm-atc: adapter {name} loaded from {source}", flush=True)

    while os.getppid() == parent:
        try:
            if call("/health")[0] == 200:
                wanted = read_manifest(manifest)
                for name, entry in wanted.items():
                    if loaded.get(name) != (entry.get("uri") or entry.get("hub")):
                        load(name, entry)
                for name in [n for n in loaded if n not in wanted]:
                    call("/v1/unload_lora_adapter", {"lora_name": name})
                    del loaded[name]
                    print(f"llm-atc: adapter {name} unloaded", flush=True)
        except (OSError, RuntimeError, ValueError) as exc:
            print(f"llm-atc: adapters: {type(exc).__name__}: {exc}", flush=True)
        except Exception as exc:  # a bucket error: said, then tried again at the next poll
            print(f"llm-atc: adapters: cannot read {manifest}: {type(exc).__name__}: {exc}", flush=True)
        time.sleep(poll)


USAGE = """usage: python3 buckets.py fetch s3://BUCKET/PREFIX DEST [SKIP_GLOB]
       python3 buckets.py stage HUB_ID s3://BUCKET/PREFIX DEST
       python3 buckets.py streamable HUB_ID s3://BUCKET/PREFIX
       python3 buckets.py adapters s3://BUCKET/.../adapters.json http://127.0.0.1:PORT DEST"""

if __name__ == "__main__":
    commands = {
        "fetch": (fetch, (2, 3)),
        "stage": (stage, (3,)),
        "streamable": (streamable, (2,)),
        "adapters": (sync_adapters, (3,)),
    }
    command, arities = commands.get(sys.argv[1] if len(sys.argv) > 1 else "", (None, ()))
    if command is None or len(sys.argv) - 2 not in arities:
        raise SystemExit(USAGE)
    command(*sys.argv[2:])
