"""Training runs as recorded, optionally compared with what the bucket holds."""

from __future__ import annotations

import time

from llm_atc.bucket_uri import RUN_PREFIX, BucketURI
from llm_atc.errors import NotFoundError, UserError
from llm_atc.registry import Registry
from llm_atc.storage import ObjectStore


def list_runs(
    *,
    model_type: str | None = None,
    name_filter: str | None = None,
    limit: int | None = None,
    remote: bool = False,
    bucket: str | None = None,
    store: str | None = None,
    registry: Registry | None = None,
) -> list[dict[str, str]]:
    """One dict per run (column -> value), newest first."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be at least 1")
    if remote and not (bucket and store):
        raise UserError("--remote needs --checkpoint_bucket and --checkpoint_store")
    where = (store, bucket) if remote and store and bucket else None
    records = [
        r
        for r in (registry or Registry()).records(kind="train")
        if (not model_type or r.details.get("model_type") == model_type) and (not name_filter or name_filter in r.name)
    ]
    rows = []
    for record in records:
        rows.append(
            {
                "NAME": record.name,
                "TYPE": record.details.get("model_type", "-"),
                "BASE MODEL": record.model,
                "CHECKPOINT": record.checkpoint_uri or "-",
                "STATUS": record.status,
                "CREATED": time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at)),
                "DESCRIPTION": record.details.get("description") or "",
            }
        )
    if where:
        rows = _with_remote(rows, *where, name_filter)
    return rows[:limit] if limit else rows


def _with_remote(rows: list[dict], store_name: str, bucket: str, name_filter: str | None) -> list[dict]:
    """Add a WHERE column and the runs that exist only in the bucket."""
    root = BucketURI.for_run(store_name, bucket, "x")
    root = BucketURI(root.scheme, root.bucket, RUN_PREFIX)
    store = ObjectStore(root.scheme)
    if not store.bucket_exists(root.bucket):
        raise NotFoundError(
            f"--checkpoint_bucket {root.scheme}://{root.bucket} does not exist or is not visible to you"
        )
    in_bucket = set(store.list_children(root))
    recorded = set()
    for row in rows:
        uri = row["CHECKPOINT"]
        in_this_bucket = uri.startswith(f"{root.scheme}://{root.bucket}/{RUN_PREFIX}/")
        recorded.add(row["NAME"])
        row["WHERE"] = "registry + bucket" if in_this_bucket and row["NAME"] in in_bucket else "registry only"
    for name in sorted(in_bucket - recorded):
        if name_filter and name_filter not in name:
            continue
        rows.append(
            {
                "NAME": name,
                "TYPE": "-",
                "BASE MODEL": "-",
                "CHECKPOINT": str(root.child(name)),
                "STATUS": "-",
                "CREATED": "-",
                "DESCRIPTION": "",
                "WHERE": "bucket only",
            }
        )
    return rows
