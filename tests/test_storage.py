"""llm_atc.storage against real object-store emulators (moto_server and gcp-storage-emulator)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from support.cli import unique
from support.net import free_port

from llm_atc.errors import NotFoundError, UserError
from llm_atc.storage import BucketURI, ObjectStore, check_checkpoint, download_checkpoint, upload_path


class Store:
    """Raw access to one emulated store through its own SDK, to arrange and inspect buckets."""

    def __init__(self, scheme: str, client):
        self.scheme, self.client = scheme, client

    def make_bucket(self) -> str:
        name = unique("bkt")
        if self.scheme == "s3":
            self.client.create_bucket(Bucket=name)
        else:
            self.client.create_bucket(name)
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        if self.scheme == "s3":
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
        else:
            self.client.bucket(bucket).blob(key).upload_from_string(data)

    def get(self, bucket: str, key: str) -> bytes:
        if self.scheme == "s3":
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return self.client.bucket(bucket).blob(key).download_as_bytes()

    def keys(self, bucket: str) -> set[str]:
        if self.scheme == "s3":
            return {o["Key"] for o in self.client.list_objects_v2(Bucket=bucket).get("Contents", [])}
        return {b.name for b in self.client.list_blobs(bucket)}


@pytest.fixture(params=["s3", "gs"])
def store(request) -> Store:
    """Each test runs once against moto (S3) and once against the GCS emulator."""
    scheme = request.param
    return Store(scheme, request.getfixturevalue("s3" if scheme == "s3" else "gcs"))


@pytest.fixture
def checkpoint(store, request) -> BucketURI:
    """The tiny model uploaded under ``<scheme>://<bucket>/llm-atc/tiny``."""
    fixture = "s3_checkpoint" if store.scheme == "s3" else "gcs_checkpoint"
    return BucketURI.parse(request.getfixturevalue(fixture))


class CountingStore(ObjectStore):
    """Our own ObjectStore, recording which keys it downloads."""

    def __init__(self, scheme: str):
        super().__init__(scheme)
        self.downloaded: list[str] = []

    def download(self, uri, dest, callback):
        self.downloaded.append(uri.prefix)
        super().download(uri, dest, callback)


def model_files(folder: Path) -> dict[str, bytes]:
    """Relative name -> content of every file in ``folder``, without our marker."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".complete"
    }


def assert_one_line(exc: BaseException, *fragments: str) -> None:
    text = str(exc)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text


# --- BucketURI ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, scheme, bucket, prefix, text",
    [
        ("s3://my-bucket/llm-atc/run-1", "s3", "my-bucket", "llm-atc/run-1", "s3://my-bucket/llm-atc/run-1"),
        ("gs://my.bucket_2/a/b/", "gs", "my.bucket_2", "a/b", "gs://my.bucket_2/a/b"),
        ("s3://abc", "s3", "abc", "", "s3://abc"),
        ("gs://abc/", "gs", "abc", "", "gs://abc"),
    ],
)
def test_parse_good_uris(uri, scheme, bucket, prefix, text):
    """Scheme, bucket and a slash-trimmed prefix are split out; str() gives the canonical URI."""
    parsed = BucketURI.parse(uri)
    assert (parsed.scheme, parsed.bucket, parsed.prefix) == (scheme, bucket, prefix)
    assert str(parsed) == text
    assert parsed.store == ("S3" if scheme == "s3" else "GCS")


def test_child_and_for_run():
    """child() joins path parts; for_run() places a run under llm-atc/."""
    uri = BucketURI.parse("s3://abc/base/")
    assert str(uri.child("sub/", "file.json")) == "s3://abc/base/sub/file.json"
    assert str(BucketURI.parse("gs://abc").child("x")) == "gs://abc/x"
    assert str(BucketURI.for_run("GCS", "ckpts", "run-7")) == "gs://ckpts/llm-atc/run-7"
    assert str(BucketURI.for_run("s3", "ckpts", "run-7")) == "s3://ckpts/llm-atc/run-7"


@pytest.mark.parametrize(
    "uri, fragments",
    [
        ("http://bucket/path", ["'http://bucket/path'", "s3://BUCKET/PATH or gs://BUCKET/PATH"]),
        ("bucket/path", ["'bucket/path'", "s3://BUCKET/PATH"]),
        ("s3://", ["''", "not a valid bucket name"]),
        ("s3:///path", ["''", "not a valid bucket name"]),
        ("gs://ab/x", ["'ab'", "not a valid bucket name"]),
        ("s3://Bad_Bucket/x", ["'Bad_Bucket'", "not a valid bucket name"]),
        ("gs://bucket!/x", ["'bucket!'", "not a valid bucket name"]),
        ("s3://-bucket/x", ["'-bucket'", "not a valid bucket name"]),
    ],
)
def test_parse_bad_uris(uri, fragments):
    """Bad URIs are a one-line UserError naming the option and the problem."""
    with pytest.raises(UserError) as info:
        BucketURI.parse(uri, option="--checkpoint_bucket")
    assert_one_line(info.value, "--checkpoint_bucket", *fragments)


def test_parse_rejects_trailing_newline_in_bucket():
    """A newline is never part of a bucket name."""
    with pytest.raises(UserError):
        BucketURI.parse("s3://bucket\n/x")


# --- check_checkpoint ----------------------------------------------------------------------


def test_check_full_model(checkpoint):
    """A prefix holding config.json is a full model."""
    result = check_checkpoint(checkpoint)
    assert result.uri == checkpoint
    assert result.is_adapter is False
    assert result.base_model is None and result.rank is None


def test_check_adapter(store):
    """adapter_config.json makes an adapter; base model and rank are read from it."""
    bucket = store.make_bucket()
    config = {"base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "r": 64, "peft_type": "LORA"}
    store.put(bucket, "llm-atc/lora-1/adapter_config.json", json.dumps(config).encode())
    store.put(bucket, "llm-atc/lora-1/adapter_model.safetensors", b"\0" * 32)
    result = check_checkpoint(BucketURI.parse(f"{store.scheme}://{bucket}/llm-atc/lora-1"))
    assert result.is_adapter is True
    assert result.base_model == "meta-llama/Llama-2-7b-hf"
    assert result.rank == 64


def test_check_missing_bucket(store):
    """A bucket that does not exist is a NotFoundError naming it."""
    bucket = unique("missing")
    with pytest.raises(NotFoundError) as info:
        check_checkpoint(BucketURI.parse(f"{store.scheme}://{bucket}/llm-atc/x"))
    assert_one_line(info.value, f"{store.scheme}://{bucket}", "does not exist")


@pytest.mark.parametrize("prefix", ["llm-atc/nothing-here", "llm-atc/only-subfolders"])
def test_check_empty_prefix(store, prefix):
    """A prefix with no objects directly under it is a NotFoundError."""
    bucket = store.make_bucket()
    store.put(bucket, "llm-atc/only-subfolders/deeper/config.json", b"{}")
    uri = BucketURI.parse(f"{store.scheme}://{bucket}/{prefix}")
    with pytest.raises(NotFoundError) as info:
        check_checkpoint(uri)
    assert_one_line(info.value, str(uri), "empty or does not exist")


def test_check_prefix_without_config(store):
    """Objects without a config are not a model: a UserError, not a NotFoundError."""
    bucket = store.make_bucket()
    store.put(bucket, "llm-atc/junk/readme.txt", b"hello")
    uri = BucketURI.parse(f"{store.scheme}://{bucket}/llm-atc/junk")
    with pytest.raises(UserError) as info:
        check_checkpoint(uri)
    assert not isinstance(info.value, NotFoundError)
    assert_one_line(info.value, str(uri), "config.json", "not a model checkpoint")


def test_check_unreachable_s3(monkeypatch):
    """A closed endpoint is a one-line UserError, returned quickly."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        check_checkpoint(BucketURI.parse("s3://some-bucket/llm-atc/run"))
    assert time.monotonic() - start < 10
    assert not isinstance(info.value, NotFoundError)
    assert_one_line(info.value, "cannot reach the object store", "s3://some-bucket")


def test_check_unreachable_gcs(monkeypatch):
    """google-cloud-storage would retry for 120 s; ours gives up within its bounded deadline."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        check_checkpoint(BucketURI.parse("gs://some-bucket/llm-atc/run"))
    assert time.monotonic() - start < 30
    assert_one_line(info.value, "cannot reach the object store", "gs://some-bucket")


# --- download_checkpoint -------------------------------------------------------------------


def test_download_is_complete_and_idempotent(checkpoint, tiny_model, tmp_path):
    """Every file arrives byte-identical with a .complete marker; a second call fetches nothing."""
    dest = tmp_path / "ckpt"
    store = CountingStore(checkpoint.scheme)
    assert download_checkpoint(checkpoint, dest, store) == dest

    expected = model_files(tiny_model)
    assert model_files(dest) == expected
    assert sorted(store.downloaded) == sorted(f"llm-atc/tiny/{name}" for name in expected)
    assert not list(dest.rglob("*.part"))
    marker = json.loads((dest / ".complete").read_text())
    assert marker["source"] == str(checkpoint) and marker["files"] == len(expected)
    assert sorted(marker["objects"]) == sorted(expected)

    again = CountingStore(checkpoint.scheme)
    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    assert download_checkpoint(checkpoint, dest, again) == dest
    assert again.downloaded == []
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == mtimes


def test_download_resumes(checkpoint, tiny_model, tmp_path):
    """Without the marker, only missing files and files of the wrong size are fetched again."""
    dest = tmp_path / "ckpt"
    download_checkpoint(checkpoint, dest, ObjectStore(checkpoint.scheme))
    names = sorted(model_files(dest))
    missing, truncated = "config.json", next(n for n in names if n.endswith(".safetensors"))
    (dest / ".complete").unlink()
    (dest / missing).unlink()
    data = (dest / truncated).read_bytes()
    (dest / truncated).write_bytes(data[: len(data) // 2])

    store = CountingStore(checkpoint.scheme)
    download_checkpoint(checkpoint, dest, store)
    assert sorted(store.downloaded) == sorted([f"llm-atc/tiny/{missing}", f"llm-atc/tiny/{truncated}"])
    assert model_files(dest) == model_files(tiny_model)
    assert (dest / ".complete").is_file()


def test_download_refreshes_a_reuploaded_file(store, tmp_path):
    """After a complete download, an object re-uploaded with the same size is fetched again, alone."""
    bucket = store.make_bucket()
    store.put(bucket, "llm-atc/r/config.json", b'{"v": 1}')
    store.put(bucket, "llm-atc/r/weights.bin", b"a" * 100)
    uri = BucketURI.parse(f"{store.scheme}://{bucket}/llm-atc/r")
    dest = tmp_path / "ckpt"
    download_checkpoint(uri, dest, ObjectStore(store.scheme))

    store.put(bucket, "llm-atc/r/weights.bin", b"b" * 100)
    counting = CountingStore(store.scheme)
    download_checkpoint(uri, dest, counting)

    assert counting.downloaded == ["llm-atc/r/weights.bin"]
    assert (dest / "weights.bin").read_bytes() == b"b" * 100
    assert (dest / "config.json").read_bytes() == b'{"v": 1}'
    assert (dest / ".complete").is_file()


def test_download_empty_prefix(store, tmp_path):
    """Downloading from an empty prefix fails without writing a marker."""
    bucket = store.make_bucket()
    uri = BucketURI.parse(f"{store.scheme}://{bucket}/llm-atc/none")
    with pytest.raises(NotFoundError) as info:
        download_checkpoint(uri, tmp_path / "d")
    assert_one_line(info.value, str(uri))
    assert not (tmp_path / "d" / ".complete").exists()


# --- upload_path and list_children ---------------------------------------------------------


def test_upload_folder(store, tmp_path):
    """A folder's files land under the URI with their relative paths."""
    folder = tmp_path / "out"
    (folder / "sub" / "deep").mkdir(parents=True)
    files = {"config.json": b'{"a": 1}', "sub/weights.bin": os.urandom(3000), "sub/deep/x.txt": b"x"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    bucket = store.make_bucket()
    uri = BucketURI.parse(f"{store.scheme}://{bucket}/llm-atc/run-up")

    names = upload_path(folder, uri)

    assert sorted(names) == sorted(files)
    assert store.keys(bucket) == {f"llm-atc/run-up/{name}" for name in files}
    for name, data in files.items():
        assert store.get(bucket, f"llm-atc/run-up/{name}") == data


def test_upload_single_file(store, tmp_path):
    """A single file lands under the URI by its own name."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "hi"}\n')
    bucket = store.make_bucket()

    names = upload_path(path, BucketURI.parse(f"{store.scheme}://{bucket}/datasets"))

    assert names == ["data.jsonl"]
    assert store.keys(bucket) == {"datasets/data.jsonl"}
    assert store.get(bucket, "datasets/data.jsonl") == path.read_bytes()


def test_list_children(store):
    """Only the folder names directly under llm-atc/ are listed, sorted."""
    bucket = store.make_bucket()
    for key in (
        "llm-atc/run-b/config.json",
        "llm-atc/run-a/adapter_config.json",
        "llm-atc/run-a/sub/nested.bin",
        "llm-atc/loose-file.txt",
        "elsewhere/run-c/config.json",
    ):
        store.put(bucket, key, b"{}")
    objects = ObjectStore(store.scheme)
    assert objects.list_children(BucketURI.parse(f"{store.scheme}://{bucket}/llm-atc")) == ["run-a", "run-b"]
    assert objects.list_children(BucketURI.parse(f"{store.scheme}://{bucket}")) == ["elsewhere", "llm-atc"]
