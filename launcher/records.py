"""The launcher's memory, in a small SQLite file in the user's state directory: which job
runs on which nodes, from which directory, with which command. Agents hold the truth about
each job; this file only says where to ask."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.protocol.errors import AmbiguousRef, JobNotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    nodes TEXT NOT NULL,
    directory TEXT NOT NULL,
    argv TEXT NOT NULL,
    bundle TEXT NOT NULL,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    nodes: list[dict[str, Any]]
    directory: str
    argv: list[str]
    bundle: str
    created: float


class Records:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def add(
        self,
        job: str,
        name: str,
        nodes: list[dict[str, Any]],
        directory: Path,
        argv: list[str],
        bundle: str,
    ) -> None:
        self.db.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job, name, json.dumps(nodes), str(directory), json.dumps(argv), bundle, time.time()),
        )

    def resolve(self, ref: str) -> JobRecord:
        """A job by id, unique id prefix, or name (the newest job of that name)."""
        ref = ref.split("@", 1)[0]
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE id >= ? AND id < ? ORDER BY id LIMIT 2",
            (ref, ref + "\uffff"),
        ).fetchall()
        exact = [r for r in rows if r[0] == ref]
        if exact:
            return _record(exact[0])
        if len(rows) == 1:
            return _record(rows[0])
        if len(rows) > 1:
            raise AmbiguousRef(f"{ref!r} matches several jobs; give more of the id", ref)
        named = self.db.execute(
            "SELECT * FROM jobs WHERE name=? ORDER BY created DESC LIMIT 1", (ref,)
        ).fetchone()
        if named is None:
            raise JobNotFound(ref)
        return _record(named)

    def last_from(self, directory: Path) -> JobRecord:
        row = self.db.execute(
            "SELECT * FROM jobs WHERE directory=? ORDER BY created DESC LIMIT 1",
            (str(directory.resolve()),),
        ).fetchone()
        if row is None:
            raise JobNotFound(f"(no job submitted from {directory})")
        return _record(row)

    def all(self, limit: int = 50) -> list[JobRecord]:
        rows = self.db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,))
        return [_record(r) for r in rows]

    def close(self) -> None:
        self.db.close()


def _record(row: tuple[Any, ...]) -> JobRecord:
    job, name, nodes, directory, argv, bundle, created = row
    return JobRecord(job, name, json.loads(nodes), directory, json.loads(argv), bundle, created)
