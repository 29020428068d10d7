"""An agent upgraded in place opens the records an older version wrote: columns added since
are added, and what was there is kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent.revlog import ADDED_COLUMNS, RevLog


def test_an_older_database_gains_the_new_columns_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "revlog.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE jobs (id TEXT PRIMARY KEY, owner INTEGER NOT NULL, name TEXT NOT NULL
            DEFAULT '', argv BLOB NOT NULL, env BLOB NOT NULL, rank INTEGER NOT NULL,
            nnodes INTEGER NOT NULL, peers BLOB NOT NULL, state TEXT NOT NULL,
            head INTEGER NOT NULL, created_ns INTEGER NOT NULL, started_ns INTEGER,
            ended_ns INTEGER, exit_code INTEGER, exit_signal INTEGER, shim_pid INTEGER,
            shim_start REAL, restart_count INTEGER NOT NULL DEFAULT 0, master_addr TEXT,
            master_port INTEGER);
        INSERT INTO jobs (id, owner, argv, env, rank, nnodes, peers, state, head, created_ns)
            VALUES ('j-old', 0, X'90', X'80', 0, 1, X'90', 'succeeded', 0, 1);
        """
    )
    old.commit()
    old.close()

    revlog = RevLog(path)
    try:
        job = revlog.get("j-old")
        assert job.state == "succeeded"
        assert job.login is True and job.gpus == 0 and job.start_revision == 0
        columns = {r[1] for r in revlog.db.execute("PRAGMA table_info(jobs)")}
        assert {column for _, column, _ in ADDED_COLUMNS} <= columns
    finally:
        revlog.close()
