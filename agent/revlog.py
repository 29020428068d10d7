"""The agent's records in SQLite (WAL, synchronous=FULL): jobs, their revisions, and events.

A job's head moves only by compare-and-swap on the expected revision, inside the same
transaction that appends the revision, so two patches based on the same head can never both
land: the second gets `StaleRevision(expected, actual)`. History is append-only: nothing here
updates or deletes a revision.

Calls are synchronous and short (one small transaction each); the agent makes them from its
event loop, which keeps the ordering of writes obvious.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from agent.protocol.errors import AmbiguousRef, JobNotFound, JobStateError, StaleRevision
from agent.protocol.objects import Revision

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner INTEGER NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    argv BLOB NOT NULL,
    env BLOB NOT NULL,
    rank INTEGER NOT NULL,
    nnodes INTEGER NOT NULL,
    peers BLOB NOT NULL,
    state TEXT NOT NULL,
    head INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    started_ns INTEGER,
    ended_ns INTEGER,
    exit_code INTEGER,
    exit_signal INTEGER,
    shim_pid INTEGER,
    shim_start REAL,
    restart_count INTEGER NOT NULL DEFAULT 0,
    master_addr TEXT,
    master_port INTEGER,
    login INTEGER NOT NULL DEFAULT 1,
    metrics_offset INTEGER NOT NULL DEFAULT 0,
    gpus INTEGER NOT NULL DEFAULT 0,
    start_revision INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS revisions (
    job TEXT NOT NULL REFERENCES jobs(id),
    number INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (job, number)
);
CREATE TABLE IF NOT EXISTS metrics (
    job TEXT NOT NULL REFERENCES jobs(id),
    seq INTEGER NOT NULL,
    at_ns INTEGER NOT NULL,
    step INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    restart INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job, seq)
);
CREATE TABLE IF NOT EXISTS gpu_holds (
    gpu INTEGER PRIMARY KEY,
    job TEXT NOT NULL,  -- reserved before the job's row exists (prepare fails fast)
    expires_ns INTEGER,
    owner INTEGER  -- who reserved it (the job row's owner, once there is one)
);
CREATE TABLE IF NOT EXISTS artifacts (
    job TEXT NOT NULL,
    path TEXT NOT NULL,
    closed_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    step INTEGER,
    revision INTEGER NOT NULL,
    since BLOB NOT NULL,
    PRIMARY KEY (job, path, closed_ns)
);
CREATE INDEX IF NOT EXISTS artifacts_by_sha ON artifacts(sha256);
CREATE TABLE IF NOT EXISTS facts (
    job TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    at_ns INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job, seq)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    job TEXT,
    at_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
"""

# Columns added after the first schema, for databases made before them.
ADDED_COLUMNS = [
    ("jobs", "login", "INTEGER NOT NULL DEFAULT 1"),
    ("jobs", "metrics_offset", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "gpus", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "start_revision", "INTEGER NOT NULL DEFAULT 0"),
    ("gpu_holds", "owner", "INTEGER"),
]

# Which states may follow which: a job is prepared, runs, then ends one way or another.
ACTIVE = ("prepared", "running")
FINAL = ("succeeded", "failed", "cancelled", "lost", "aborted")


@dataclass
class Job:
    id: str
    owner: int
    name: str
    argv: list[str]
    env: dict[str, str]
    rank: int
    nnodes: int
    peers: list[str]
    state: str
    head: int
    created_ns: int
    started_ns: int | None = None
    ended_ns: int | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    shim_pid: int | None = None
    shim_start: float | None = None
    restart_count: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    login: bool = True
    metrics_offset: int = 0
    gpus: int = 0
    start_revision: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


_PACKED = ("argv", "env", "peers")


class RevLog:
    def __init__(self, path: Path) -> None:
        # isolation_level=None: we open transactions ourselves with BEGIN IMMEDIATE, so a
        # compare-and-swap reads and writes under one write lock.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Provenance records are written from worker threads (asyncio.to_thread) on this same
        # connection: transactions take turns, else one thread's BEGIN lands inside another's
        # transaction ("cannot start a transaction within a transaction") and their writes mix.
        self._tx_lock = threading.RLock()
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """An agent upgraded in place keeps its records: columns added since the first
        release are added to an older database (CREATE TABLE IF NOT EXISTS leaves it as is)."""
        for table, column, declaration in ADDED_COLUMNS:
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        self.db.close()

    # -------------------------------------------------------------------------- jobs

    def create_job(self, job: Job, revision: Revision) -> None:
        """Record a new job and its revision 0 in one transaction."""
        row = {k: v for k, v in vars(job).items() if k != "extra"}
        for key in _PACKED:
            row[key] = msgpack.packb(row[key])
        with self._transaction():
            if self.db.execute("SELECT 1 FROM jobs WHERE id=?", (job.id,)).fetchone():
                raise JobStateError(f"job {job.id} already exists on this node", job.id)
            cols = ", ".join(row)
            marks = ", ".join(f":{k}" for k in row)
            self.db.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", row)
            self.db.execute(
                "INSERT INTO revisions (job, number, record) VALUES (?, ?, ?)",
                (job.id, revision.number, revision.encode()),
            )
            self._event(job.id, "prepared", f"r0 {revision.bundle[:12]}")

    def get(self, job_id: str) -> Job:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return _job(row)

    def resolve(self, ref: str) -> Job:
        """A job by id or unique prefix."""
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE id >= ? AND id < ? ORDER BY id LIMIT 2",
            (ref, ref + "\uffff"),
        ).fetchall()
        exact = [r for r in rows if r["id"] == ref]
        if exact:
            return _job(exact[0])
        if not rows:
            raise JobNotFound(ref)
        if len(rows) > 1:
            raise AmbiguousRef(f"{ref!r} matches several jobs; give more of the id", ref)
        return _job(rows[0])

    def jobs(self, owner: int | None = None, states: tuple[str, ...] = ()) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", list[Any]()
        if owner is not None:
            sql += " AND owner=?"
            args.append(owner)
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args.extend(states)
        return [_job(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def update(self, job_id: str, **fields: Any) -> None:
        """Set plain columns of a job (state, pids, exit status); never its head."""
        assert "head" not in fields, "the head moves only through append_revision"
        sets = ", ".join(f"{k}=:{k}" for k in fields)
        with self._transaction():
            self.db.execute(f"UPDATE jobs SET {sets} WHERE id=:id", {**fields, "id": job_id})
            if "state" in fields:
                self._event(job_id, "state", str(fields["state"]))

    # --------------------------------------------------------------------- revisions

    def append_revision(self, revision: Revision) -> None:
        """Move the job's head from revision.parent to revision.number, or StaleRevision."""
        assert revision.parent is not None
        with self._transaction():
            cur = self.db.execute(
                "UPDATE jobs SET head=? WHERE id=? AND head=?",
                (revision.number, revision.job, revision.parent),
            )
            if cur.rowcount != 1:
                actual = self.get(revision.job).head
                raise StaleRevision(revision.parent, actual)
            self.db.execute(
                "INSERT INTO revisions (job, number, record) VALUES (?, ?, ?)",
                (revision.job, revision.number, revision.encode()),
            )
            self._event(revision.job, "revision", f"r{revision.number} {revision.reason}")

    def revisions(self, job_id: str) -> list[Revision]:
        rows = self.db.execute(
            "SELECT record FROM revisions WHERE job=? ORDER BY number", (job_id,)
        )
        return [Revision.decode(r["record"]) for r in rows]

    def revision(self, job_id: str, number: int) -> Revision:
        row = self.db.execute(
            "SELECT record FROM revisions WHERE job=? AND number=?", (job_id, number)
        ).fetchone()
        if row is None:
            raise JobNotFound(f"{job_id}@r{number}")
        return Revision.decode(row["record"])

    def head(self, job_id: str) -> Revision:
        return self.revision(job_id, self.get(job_id).head)

    # ----------------------------------------------------------------------- metrics

    def add_metrics(
        self, job_id: str, points: list[tuple[int, int, int, int, bytes]], offset: int
    ) -> None:
        """Append (at_ns, step, revision, restart, data) points read up to byte `offset` of
        the job's metrics file; old points are never overwritten."""
        with self._transaction():
            row = self.db.execute(
                "SELECT COALESCE(MAX(seq), -1) FROM metrics WHERE job=?", (job_id,)
            ).fetchone()
            seq = row[0] + 1
            self.db.executemany(
                "INSERT INTO metrics (job, seq, at_ns, step, revision, restart, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(job_id, seq + i, *point) for i, point in enumerate(points)],
            )
            self.db.execute("UPDATE jobs SET metrics_offset=? WHERE id=?", (offset, job_id))

    def metrics(self, job_id: str) -> list[tuple[int, int, int, int, bytes]]:
        rows = self.db.execute(
            "SELECT at_ns, step, revision, restart, data FROM metrics WHERE job=? ORDER BY seq",
            (job_id,),
        )
        return [tuple(r) for r in rows]

    # ---------------------------------------------------------------------- provenance

    def add_artifact(
        self,
        job_id: str,
        path: str,
        closed_ns: int,
        size: int,
        sha256: str,
        step: int | None,
        revision: int,
        since: list[int],
    ) -> None:
        with self._transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, path, closed_ns, size, sha256, step, revision, msgpack.packb(since)),
            )

    def artifacts(
        self, job_id: str | None = None, sha256: str | None = None
    ) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM artifacts WHERE 1=1", list[Any]()
        if job_id is not None:
            sql += " AND job=?"
            args.append(job_id)
        if sha256 is not None:
            sql += " AND sha256=?"
            args.append(sha256)
        rows = self.db.execute(sql + " ORDER BY closed_ns", args)
        return [{**dict(r), "since": msgpack.unpackb(r["since"])} for r in rows]

    def add_fact(self, job_id: str, kind: str, data: Any) -> None:
        """A recorded fact about a job: its environment at a start, its data, its parent."""
        with self._transaction():
            row = self.db.execute(
                "SELECT COALESCE(MAX(seq), -1) FROM facts WHERE job=?", (job_id,)
            ).fetchone()
            self.db.execute(
                "INSERT INTO facts VALUES (?, ?, ?, ?, ?)",
                (job_id, row[0] + 1, kind, time.time_ns(), msgpack.packb(data, use_bin_type=True)),
            )

    def facts(self, job_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT kind, at_ns, data FROM facts WHERE job=?", list[Any]([job_id])
        if kind is not None:
            sql += " AND kind=?"
            args.append(kind)
        rows = self.db.execute(sql + " ORDER BY seq", args)
        return [
            {"kind": r["kind"], "at_ns": r["at_ns"], "data": msgpack.unpackb(r["data"], raw=False)}
            for r in rows
        ]

    # --------------------------------------------------------------------------- GPUs

    def reserve_gpus(
        self,
        job_id: str,
        gpus: list[int],
        count: int,
        now_ns: int,
        expires_ns: int,
        owner: int | None = None,
    ) -> list[int] | None:
        """In one transaction: take back expired holds of jobs never started (they become
        aborted), then hold `count` free GPUs for job_id (or None if too few are free).
        A job that already holds GPUs keeps exactly those (a retried prepare)."""
        with self._transaction():
            expired = self.db.execute(
                "SELECT DISTINCT job FROM gpu_holds WHERE expires_ns IS NOT NULL AND "
                "expires_ns < ?",
                (now_ns,),
            ).fetchall()
            for (stale,) in expired:
                self.db.execute("DELETE FROM gpu_holds WHERE job=?", (stale,))
                self.db.execute(
                    "UPDATE jobs SET state='aborted', ended_ns=? WHERE id=? AND state='prepared'",
                    (now_ns, stale),
                )
                self._event(stale, "state", "aborted: GPU reservation expired")
            mine = [
                r[0]
                for r in self.db.execute(
                    "SELECT gpu FROM gpu_holds WHERE job=? AND (owner IS NULL OR ? IS NULL "
                    "OR owner=?) ORDER BY gpu",
                    (job_id, owner, owner),
                )
            ]
            if mine:
                return mine
            held = {r[0] for r in self.db.execute("SELECT gpu FROM gpu_holds")}
            free = [g for g in gpus if g not in held]
            if len(free) < count:
                return None
            chosen = free[:count]
            self.db.executemany(
                "INSERT INTO gpu_holds (gpu, job, expires_ns, owner) VALUES (?, ?, ?, ?)",
                [(g, job_id, expires_ns, owner) for g in chosen],
            )
            return chosen

    def confirm_gpus(self, job_id: str) -> list[int]:
        with self._transaction():
            self.db.execute("UPDATE gpu_holds SET expires_ns=NULL WHERE job=?", (job_id,))
            return [
                r[0]
                for r in self.db.execute(
                    "SELECT gpu FROM gpu_holds WHERE job=? ORDER BY gpu", (job_id,)
                )
            ]

    def release_gpus(self, job_id: str, owner: int | None = None) -> None:
        """Give back a job's GPUs; with `owner`, only holds that user made."""
        with self._transaction():
            if owner is None:
                self.db.execute("DELETE FROM gpu_holds WHERE job=?", (job_id,))
            else:
                self.db.execute("DELETE FROM gpu_holds WHERE job=? AND owner=?", (job_id, owner))

    def gpu_holders(self, now_ns: int) -> dict[int, dict[str, Any]]:
        """Live holds (not expired): gpu -> {job, owner, owner_name}. A hold made by `reserve`
        before its job is recorded counts too, under the user who reserved it."""
        import pwd

        rows = self.db.execute(
            "SELECT h.gpu, h.job, COALESCE(j.owner, h.owner) FROM gpu_holds h "
            "LEFT JOIN jobs j ON j.id = h.job "
            "WHERE h.expires_ns IS NULL OR h.expires_ns >= ?",
            (now_ns,),
        )
        out = {}
        for gpu, job, owner in rows:
            try:
                name = "?" if owner is None else pwd.getpwuid(owner).pw_name
            except KeyError:
                name = str(owner)
            out[gpu] = {"job": job, "owner": owner, "owner_name": name}
        return out

    # ------------------------------------------------------------------------ events

    def events(self, job_id: str) -> list[tuple[int, str, str]]:
        rows = self.db.execute(
            "SELECT at_ns, kind, detail FROM events WHERE job=? ORDER BY id", (job_id,)
        )
        return [(r["at_ns"], r["kind"], r["detail"]) for r in rows]

    def _event(self, job_id: str | None, kind: str, detail: str = "") -> None:
        self.db.execute(
            "INSERT INTO events (job, at_ns, kind, detail) VALUES (?, ?, ?, ?)",
            (job_id, time.time_ns(), kind, detail),
        )

    def _transaction(self) -> _Tx:
        return _Tx(self.db, self._tx_lock)


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self.db = db
        self.lock = lock

    def __enter__(self) -> None:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()


def _job(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["login"] = bool(values["login"])
    for key in _PACKED:
        values[key] = msgpack.unpackb(values[key], raw=False)
    return Job(**values)
