"""The local registry: a SQLite file of every serve and train, with numbered migrations.

Nothing secret is ever written here. Writers use short ``BEGIN IMMEDIATE``
transactions with a busy timeout so many processes can record at once; the file is
private (0600), a damaged file is reported in one line naming it, and a row that cannot
be read is skipped with a warning instead of breaking every other.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict

from llm_atc.errors import NotFoundError, UserError
from llm_atc.options import shorten
from llm_atc.paths import FILE_MODE, create_private, home, store_errors

# Each entry upgrades the schema by one version; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE deployments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('serve', 'train')),
        model TEXT NOT NULL,
        cluster TEXT NOT NULL,
        cloud TEXT,
        region TEXT,
        accelerator TEXT,
        checkpoint_uri TEXT,
        task_yaml TEXT,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX deployments_cluster ON deployments (cluster);
    CREATE INDEX deployments_name ON deployments (name);
    """,
    """
    ALTER TABLE deployments ADD COLUMN engine TEXT;
    ALTER TABLE deployments ADD COLUMN port INTEGER;
    ALTER TABLE deployments ADD COLUMN pid INTEGER;
    ALTER TABLE deployments ADD COLUMN endpoint TEXT;
    ALTER TABLE deployments ADD COLUMN details TEXT NOT NULL DEFAULT '{}';
    """,
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
)


class Status:
    """Lifecycle states we record (SkyPilot's own states are shown beside them)."""

    LAUNCHING = "LAUNCHING"
    RUNNING = "RUNNING"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    DOWN = "DOWN"
    SUCCEEDED = "SUCCEEDED"


class PriceDetails(TypedDict):
    per_hour: float | None  # $/h, None where nothing says
    source: str  # where the figure comes from (the catalog, --price_per_hour, own hardware)


class RuntimeLora(TypedDict):
    max_loras: int
    max_rank: int
    base: str  # the model adapters must be trained on


class Details(TypedDict, total=False):
    """What a record keeps beyond its columns (the ``details`` JSON column). Every key is optional: older
    records lack the newer ones, and each kind of launch writes its own."""

    # every launch
    log: str  # the log file of what runs here
    job_id: int  # SkyPilot's job (or managed job) id
    started: float  # a process here: its start time, and its start in clock ticks (to tell a reused pid)
    start_ticks: int
    ended: str  # why it ended, as SkyPilot or the watcher said
    price: PriceDetails
    limits: dict[str, float]  # how it ends by itself: idle_minutes, max_hours (spec.Limits)
    store_env: dict[str, str]  # where its buckets are (endpoints, regions; never keys)
    managed: bool  # a managed job (train on spot)
    # serve
    service: bool  # a SkyServe service
    open_ports: bool
    private: bool  # no API key and no opened port: reached through `endpoint --forward`
    tls_cert: str  # the certificate clients trust (vLLM's own HTTPS)
    task: str  # what the model is served for, and its parsers (model_tasks.Serving.details)
    tool_parser: str
    reasoning_parser: str
    aliases: list[str]
    models: list[dict[str, Any]]  # serve --name A --name B: each one's name, place, port and task
    lora: RuntimeLora
    adapters: dict[str, dict[str, Any]]  # runtime adapters by served name (adapters add, promote)
    adapters_manifest: str  # a service's adapter manifest in its bucket
    scores: dict[str, dict[str, Any]]  # eval: held-out scores by model (on a deployment) or data set (on a run)
    promotions: dict[str, dict[str, Any]]  # promote: each adapter name's versions
    service_update: bool  # a service is rolling to a promoted model
    # train
    model_type: str
    description: str
    data: str  # the data URI the node reads
    eval_fraction: float


@dataclass
class Record:
    """One serve or train, as stored."""

    name: str
    kind: str
    model: str
    cluster: str
    status: str
    cloud: str | None = None
    region: str | None = None
    accelerator: str | None = None
    checkpoint_uri: str | None = None
    task_yaml: str | None = None
    engine: str | None = None
    port: int | None = None
    pid: int | None = None
    endpoint: str | None = None
    details: Details = field(default_factory=lambda: Details())
    created_at: float = 0.0
    updated_at: float = 0.0
    id: int | None = None

    @property
    def key(self) -> int:
        """Its row in the registry (a record gets one when it is added)."""
        if self.id is None:
            raise ValueError(f"{self.name} on {self.cluster} is not in the registry yet")
        return self.id

    @property
    def is_local(self) -> bool:
        return self.cloud == "local"

    @property
    def mode(self) -> str:
        """How it runs: ``local`` (a process here), ``service`` (SkyServe), ``managed`` (a managed job)
        or ``cluster`` (a job on a SkyPilot cluster)."""
        if self.is_local:
            return "local"
        if self.details.get("service"):
            return "service"
        return "managed" if self.details.get("managed") else "cluster"

    @property
    def price(self) -> PriceDetails:
        """What it was launched at: $/h (None where nothing said) and where that figure came from."""
        return self.details.get("price") or {"per_hour": None, "source": ""}

    @property
    def served(self) -> list[str]:
        """The names clients send as ``model`` (several for ``serve --name A --name B``)."""
        return [m["name"] for m in self.details.get("models", ())] or [self.name]

    def task_of(self, model: str | None = None) -> str:
        """What ``model`` (a served name; None: the first) is served for: generate, embed, rerank or classify."""
        for entry in self.details.get("models", ()):
            if model in (None, entry["name"]):
                return entry.get("task", "generate")
        return self.details.get("task", "generate")

    @property
    def is_active(self) -> bool:
        """It may still be running (or starting) somewhere."""
        return self.status in (Status.LAUNCHING, Status.RUNNING)


_COLUMNS = [f.name for f in fields(Record) if f.name != "id"]


class Registry:
    """Access to ``$LLM_ATC_HOME/registry.db``."""

    def __init__(self, path: Path | None = None):
        self.path = path or home() / "registry.db"
        with self._damage():
            create_private(self.path)
            for suffix in ("-wal", "-shm"):  # SQLite gives them the database file's mode; older ones may be 0644
                try:
                    os.chmod(self.path.with_name(self.path.name + suffix), FILE_MODE)
                except FileNotFoundError:
                    pass  # none, or another process's last connection just removed it
            self._migrate()

    def _damage(self):
        return store_errors(self.path, "registry")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    def _migrate(self) -> None:
        conn = self._connect()
        try:
            _retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL"))
            if conn.execute("PRAGMA user_version").fetchone()[0] >= len(MIGRATIONS):
                return
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        finally:
            conn.close()

    @property
    def schema_version(self) -> int:
        conn = self._connect()
        try:
            return conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            conn.close()

    def add(self, record: Record, *, holds_port=None) -> Record:
        """Insert ``record``; returns it with its id and timestamps set.

        ``holds_port(other)``: for a process on this machine, whether another local record still
        holds its port; checked and inserted in one transaction, so two llm-atc processes never
        both claim one port.
        """
        now = time.time()
        record.created_at = record.created_at or now
        record.updated_at = now
        values = _row_values(record)
        with self._damage():
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
                if holds_port is not None:
                    rows = conn.execute(
                        "SELECT * FROM deployments WHERE cloud = 'local' AND kind = 'serve' AND port = ? "
                        "AND status IN (?, ?)",
                        [record.port, Status.LAUNCHING, Status.RUNNING],
                    ).fetchall()
                    for other in filter(None, map(_record_or_none, rows)):
                        if holds_port(other):
                            raise UserError(
                                f"port {record.port} is taken by {other.name} ({other.cluster}); pass "
                                "--port N, or --port 0 for a free one"
                            )
                cur = conn.execute(
                    f"INSERT INTO deployments ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                    [values[c] for c in _COLUMNS],
                )
                conn.execute("COMMIT")
                record.id = cur.lastrowid
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.close()
        return record

    def update(self, record: Record, **changes) -> Record:
        """Change fields of a stored record."""
        if record.id is None:
            raise ValueError("record has not been added")
        for key, value in changes.items():
            setattr(record, key, value)
        record.updated_at = time.time()
        values = _row_values(record)
        with self._damage():
            conn = self._connect()
            try:
                conn.execute(
                    f"UPDATE deployments SET {', '.join(f'{c} = ?' for c in _COLUMNS)} WHERE id = ?",
                    [values[c] for c in _COLUMNS] + [record.id],
                )
            finally:
                conn.close()
        return record

    def records(self, *, kind: str | None = None) -> list[Record]:
        """All records, newest first."""
        query = "SELECT * FROM deployments"
        args: list = []
        if kind:
            query += " WHERE kind = ?"
            args.append(kind)
        query += " ORDER BY created_at DESC, id DESC"
        return list(self._select(query, args))

    def find(self, ref: str, *, kind: str | None = None) -> Record:
        """The newest record whose cluster or name is ``ref``; a NotFoundError naming the closest ones."""
        records = self.records(kind=kind)
        for record in records:
            if ref in (record.cluster, record.name):
                return record
        import difflib

        what = {"train": "training run", "serve": "deployment"}.get(kind or "", "deployment or training run")
        known = sorted({name for record in records for name in (record.name, record.cluster)})
        close = difflib.get_close_matches(ref, known, n=3, cutoff=0.6)
        if close:
            hint = f"; did you mean {', '.join(close)}?"
        elif known:
            hint = "; see `llm-atc status`"
        else:
            hint = f" (there is no {what} yet)"
        raise NotFoundError(f"no {what} named {shorten(ref)}{hint}")

    def setting(self, key: str, default: str) -> tuple[str, bool]:
        """The setting ``key``, stored as ``default`` when it has none yet; (value, whether it was new).
        Processes asking at once all get the one value that was stored first."""
        with self._damage():
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
                new = conn.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)", [key, default]).rowcount == 1
                value = conn.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()[0]
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.close()
        return value, new

    def find_run(self, run: str) -> Record | None:
        """The newest training run called ``run`` that has a checkpoint URI."""
        for record in self.records(kind="train"):
            if record.name == run and record.checkpoint_uri:
                return record
        return None

    def _select(self, query: str, args: list) -> Iterator[Record]:
        with self._damage():
            conn = self._connect()
            try:
                rows = conn.execute(query, args).fetchall()
            finally:
                conn.close()
        for row in rows:
            record = _record_or_none(row)
            if record is None:
                from llm_atc import ui

                ui.warn(f"{self.path}: row {dict(row).get('id')} cannot be read; it is left out")
                continue
            yield record


def _record_or_none(row: sqlite3.Row) -> Record | None:
    """The record a row holds, or None when the row is damaged (bad JSON, missing values)."""
    try:
        data = dict(row)
        data["details"] = json.loads(data.get("details") or "{}")
        if not isinstance(data["details"], dict) or not all(data[k] for k in ("name", "kind", "cluster", "status")):
            return None
        return Record(**data)
    except (ValueError, TypeError, KeyError):
        return None


def _retry_locked(statement, timeout: float = 30.0) -> None:
    """Run ``statement``, retrying while another process holds the database lock.

    Switching to WAL does not wait for the busy timeout, so processes creating the
    registry at the same moment would otherwise fail at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            statement()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _row_values(record: Record) -> dict:
    values = asdict(record)
    values["details"] = json.dumps(record.details, sort_keys=True)
    return values
