"""llm_atc.registry: migrations, records, look-ups and concurrent writers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llm_atc.errors import NotFoundError
from llm_atc.registry import MIGRATIONS, Record, Registry, Status, home


def serve_record(name: str = "vicuna", **fields) -> Record:
    values = dict(kind="serve", model=f"lmsys/{name}", cluster=f"llm-atc-{name}", status=Status.LAUNCHING)
    values.update(fields)
    return Record(name=name, **values)


def columns(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[1] for row in conn.execute("PRAGMA table_info(deployments)")]


def test_new_db_is_fully_migrated(tmp_path):
    """A fresh file gets every migration and the newest columns."""
    path = tmp_path / "reg.db"
    registry = Registry(path)
    assert len(MIGRATIONS) >= 2
    assert registry.schema_version == len(MIGRATIONS)
    assert {"engine", "port", "pid", "endpoint", "details"} <= set(columns(path))
    assert registry.records() == []


def test_default_path_is_in_llm_atc_home(llm_atc_home):
    """Without a path the registry lives in $LLM_ATC_HOME, created on demand."""
    registry = Registry()
    assert home() == llm_atc_home
    assert registry.path == llm_atc_home / "registry.db"
    assert registry.path.is_file()


def test_reopen_is_a_no_op(tmp_path):
    """Opening an up-to-date db changes neither its schema nor its rows."""
    path = tmp_path / "reg.db"
    first = Registry(path)
    added = first.add(serve_record())
    before = columns(path)
    second = Registry(path)
    assert second.schema_version == len(MIGRATIONS)
    assert columns(path) == before
    assert [r.id for r in second.records()] == [added.id]


def test_version_1_db_is_upgraded_with_data_kept(tmp_path):
    """A db made by the first release gains the new columns and keeps its rows."""
    path = tmp_path / "reg.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute(
        "INSERT INTO deployments (name, kind, model, cluster, cloud, accelerator, checkpoint_uri, status, "
        "created_at, updated_at) VALUES ('old', 'train', 'meta-llama/Llama-2-7b-hf', 'llm-atc-train-old', "
        "'aws', 'A100:8', 's3://b/llm-atc/old', 'SUCCEEDED', 100.0, 100.0)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    registry = Registry(path)

    assert registry.schema_version == len(MIGRATIONS)
    [record] = registry.records()
    assert (record.name, record.kind, record.cluster, record.cloud) == ("old", "train", "llm-atc-train-old", "aws")
    assert record.checkpoint_uri == "s3://b/llm-atc/old"
    assert record.created_at == 100.0
    assert record.engine is None and record.port is None and record.details == {}
    assert registry.find_run("old").id == record.id


def test_add_sets_id_and_timestamps(tmp_path):
    """add() returns the record with a fresh id and created/updated times; all fields round-trip."""
    registry = Registry(tmp_path / "reg.db")
    start = time.time()
    record = registry.add(
        serve_record(
            cloud="gcp",
            region="us-central1",
            accelerator="L4:1",
            engine="vllm",
            port=8000,
            endpoint="http://1.2.3.4:8000",
            details={"served": ["a", "b"], "n": 2},
        )
    )
    assert record.id is not None
    assert start <= record.created_at == record.updated_at <= time.time()
    [stored] = registry.records()
    assert stored == record
    assert stored.details == {"served": ["a", "b"], "n": 2}
    assert not stored.is_local
    assert registry.update(stored, cloud="local").is_local and registry.records()[0].is_local


def test_update_changes_stored_fields(tmp_path):
    """update() writes the changes and bumps updated_at, leaving created_at alone."""
    registry = Registry(tmp_path / "reg.db")
    record = registry.add(serve_record(created_at=1.0))
    created = record.created_at
    registry.update(record, status=Status.RUNNING, endpoint="http://127.0.0.1:9000", details={"pid": 7})
    [stored] = registry.records()
    assert stored.status == Status.RUNNING
    assert stored.endpoint == "http://127.0.0.1:9000"
    assert stored.details == {"pid": 7}
    assert stored.created_at == created < stored.updated_at


def test_update_of_unsaved_record_fails(tmp_path):
    """A record without an id cannot be updated."""
    with pytest.raises(ValueError):
        Registry(tmp_path / "reg.db").update(serve_record(), status=Status.DOWN)


def test_records_newest_first_and_by_kind(tmp_path):
    """records() orders by creation time, newest first, and filters by kind."""
    registry = Registry(tmp_path / "reg.db")
    a = registry.add(serve_record("a", created_at=10.0))
    b = registry.add(serve_record("b", kind="train", created_at=30.0))
    c = registry.add(serve_record("c", created_at=20.0))
    assert [r.name for r in registry.records()] == ["b", "c", "a"]
    assert [r.id for r in registry.records(kind="serve")] == [c.id, a.id]
    assert [r.id for r in registry.records(kind="train")] == [b.id]


def test_find_by_cluster_or_name_newest_wins(tmp_path):
    """find() matches cluster or name and returns the newest match."""
    registry = Registry(tmp_path / "reg.db")
    registry.add(serve_record("vicuna", created_at=1.0))
    newer = registry.add(serve_record("vicuna", created_at=2.0, cluster="other-cluster"))
    trained = registry.add(serve_record("run1", kind="train", cluster="llm-atc-train-run1", created_at=3.0))
    assert registry.find("vicuna").id == newer.id
    assert registry.find("llm-atc-vicuna").cluster == "llm-atc-vicuna"
    assert registry.find("run1", kind="train").id == trained.id
    with pytest.raises(NotFoundError):
        registry.find("run1", kind="serve")


@pytest.mark.parametrize(
    "kind, what", [(None, "no deployment or training run named"), ("train", "no training run named")]
)
def test_find_unknown(tmp_path, kind, what):
    """An unknown reference is a one-line NotFoundError naming it."""
    registry = Registry(tmp_path / "reg.db")
    registry.add(serve_record())
    with pytest.raises(NotFoundError) as info:
        registry.find("nope", kind=kind)
    message = str(info.value)
    assert "\n" not in message
    assert what in message and "'nope'" in message
    assert ("llm-atc status" in message) if kind is None else ("there is no training run yet" in message)
    registry.add(serve_record(name="nope2", cluster="nope2"))
    with pytest.raises(NotFoundError, match="did you mean nope2"):
        registry.find("nope", kind="serve")  # the closest known names


def test_find_run_needs_a_checkpoint(tmp_path):
    """find_run() returns the newest train record of that name that has a checkpoint URI."""
    registry = Registry(tmp_path / "reg.db")
    assert registry.find_run("r") is None
    registry.add(serve_record("r", kind="serve", checkpoint_uri="s3://b/llm-atc/r"))
    registry.add(serve_record("r", kind="train", created_at=5.0))
    assert registry.find_run("r") is None
    old = registry.add(serve_record("r", kind="train", checkpoint_uri="s3://b/llm-atc/r", created_at=1.0))
    assert registry.find_run("r").id == old.id
    new = registry.add(serve_record("r", kind="train", checkpoint_uri="gs://b/llm-atc/r", created_at=2.0))
    assert registry.find_run("r").id == new.id
    assert registry.find_run("r").checkpoint_uri == "gs://b/llm-atc/r"


WRITER = """
import os, sys, time
from pathlib import Path
from llm_atc.registry import Record, Registry
go = Path(sys.argv[1])
(go.parent / f"ready-{sys.argv[2]}").touch()
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.005)
registry = Registry()
for i in range(50):
    registry.add(Record(name=f"w{sys.argv[2]}-{i}", kind="serve", model="m", cluster="c", status="RUNNING"))
"""


def test_concurrent_writers(llm_atc_home, tmp_path):
    """8 processes adding 50 records each to one registry at the same time lose nothing."""
    Registry()  # see test_first_open_waits_for_a_locked_db for concurrent creation
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(go), str(n)], stderr=subprocess.PIPE, text=True)
        for n in range(8)
    ]
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("ready-*"))) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # all start writing at once
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, "\n".join(errors)

    records = Registry().records()
    assert len(records) == 400
    assert len({r.id for r in records}) == 400
    assert {r.name for r in records} == {f"w{n}-{i}" for n in range(8) for i in range(50)}
    assert Registry().schema_version == len(MIGRATIONS)


def test_first_open_waits_for_a_locked_db(tmp_path):
    """Creating the registry while another writer briefly holds the file waits instead of failing."""
    path = tmp_path / "reg.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE other (x)")
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        registry = Registry(path)
    finally:
        release.join()
        holder.close()
    assert registry.schema_version == len(MIGRATIONS)


def test_two_openers_of_an_old_db_migrate_it_once(tmp_path, monkeypatch):
    """Both openers see the old schema version before either migrates (a barrier makes sure of it, every run): the
    first migrates inside its write lock, the second waits for that lock, reads the version again there and finds
    nothing left to do. Running a migration twice would fail (its ALTERs exist already)."""
    path = tmp_path / "reg.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version = 1")
    both_checked = threading.Barrier(2, timeout=30)
    connect = Registry._connect

    class Racing:
        """A connection that, after the first version check outside a transaction, waits for the other opener."""

        def __init__(self, conn):
            self.conn, self.checked = conn, False

        def execute(self, statement, *args):
            result = self.conn.execute(statement, *args)
            if statement == "PRAGMA user_version" and not self.checked and not self.conn.in_transaction:
                self.checked = True
                rows = result.fetchall()
                both_checked.wait()
                return _Rows(rows)
            return result

        def __getattr__(self, name):
            return getattr(self.conn, name)

    class _Rows:
        """What the version check had read, handed over after the wait."""

        def __init__(self, rows):
            self.rows = rows

        def fetchone(self):
            return self.rows[0]

    monkeypatch.setattr(Registry, "_connect", lambda self: Racing(connect(self)))
    errors: list[BaseException] = []

    def open_it():
        try:
            Registry(path)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    openers = [threading.Thread(target=open_it) for _ in range(2)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join(60)
    assert errors == []
    monkeypatch.setattr(Registry, "_connect", connect)
    assert Registry(path).schema_version == len(MIGRATIONS)
    assert columns(path).count("engine") == 1
