"""Bucket URIs (``s3://bucket/prefix``, ``gs://bucket/prefix``) and where a run keeps its checkpoint: parsing
only, no client (``storage`` reads and writes buckets)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from llm_atc.errors import UserError

RUN_PREFIX = "llm-atc"  # a run's checkpoint: <bucket>/llm-atc/<run>/
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$")


@dataclass(frozen=True)
class BucketURI:
    """``s3://bucket/prefix`` or ``gs://bucket/prefix``."""

    scheme: str
    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, uri: str, *, option: str = "--source") -> BucketURI:
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme not in ("s3", "gs"):
            raise UserError(f"{option} {uri!r} must be an s3://BUCKET/PATH or gs://BUCKET/PATH URI")
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET_RE.fullmatch(bucket):
            raise UserError(f"{option} {uri!r}: {bucket!r} is not a valid bucket name")
        return cls(scheme, bucket, prefix.strip("/"))

    @classmethod
    def for_run(cls, store: str, bucket: str, run: str) -> BucketURI:
        """Where run ``run`` keeps its checkpoint: ``<bucket>/llm-atc/<run>``."""
        scheme = {"S3": "s3", "GCS": "gs"}[store.upper()]
        if not _BUCKET_RE.fullmatch(bucket):
            raise UserError(f"--checkpoint_bucket {bucket!r} is not a valid bucket name")
        return cls(scheme, bucket, f"{RUN_PREFIX}/{run}")

    def child(self, *parts: str) -> BucketURI:
        return BucketURI(self.scheme, self.bucket, "/".join(p.strip("/") for p in (self.prefix, *parts) if p))

    @property
    def store(self) -> str:
        return "S3" if self.scheme == "s3" else "GCS"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")
