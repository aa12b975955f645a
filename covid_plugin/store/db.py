"""The SQLite store: schema, migrations and connections.

One database file in WAL mode holds the instance index, the series, the job queue and the
outbox, so that every state change is one transaction. Each thread gets its own connection
(sqlite3 connections are not shareable); writers serialise on SQLite's own lock.
The SQL lives in store/ only, so that a PostgreSQL backend can replace this module.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Each entry upgrades the schema by one version; never edit an entry once released.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE instances (
        sop_instance_uid TEXT PRIMARY KEY,
        sop_class_uid TEXT NOT NULL,
        series_uid TEXT NOT NULL,
        study_uid TEXT NOT NULL,
        transfer_syntax TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        calling_ae TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE INDEX instances_series ON instances(series_uid);
    CREATE TABLE series (
        series_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL,
        modality TEXT NOT NULL,
        sop_class_uid TEXT NOT NULL,
        body_part TEXT NOT NULL,
        description TEXT NOT NULL,
        image_type TEXT NOT NULL,
        calling_ae TEXT NOT NULL,
        n_instances INTEGER NOT NULL,
        first_at REAL NOT NULL,
        last_at REAL NOT NULL
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        series_uid TEXT NOT NULL REFERENCES series(series_uid),
        state TEXT NOT NULL CHECK (state IN
            ('received', 'queued', 'running', 'done', 'failed', 'rejected')),
        reason TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        n_instances_at_queue INTEGER
    );
    CREATE INDEX jobs_state ON jobs(state, id);
    CREATE UNIQUE INDEX jobs_open_series ON jobs(series_uid) WHERE state = 'received';
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER REFERENCES jobs(id),
        path TEXT NOT NULL,
        sop_instance_uid TEXT NOT NULL,
        dest_ae TEXT NOT NULL,
        dest_host TEXT NOT NULL,
        dest_port INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX outbox_due ON outbox(state, next_attempt_at);
    CREATE TABLE rejected_instances (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sop_instance_uid TEXT,
        calling_ae TEXT NOT NULL,
        reason TEXT NOT NULL,
        path TEXT,
        received_at REAL NOT NULL
    );
    """,
    # 2: quarantined and superseded jobs, a retry-later time, the reports a finished job sent
    # (JSON, for a later re-run to name as predecessors) and the job it replaced, and how each
    # series' associations ended. Rebuilding `jobs` is SQLite's way to change a CHECK
    # constraint, done with foreign keys off (see _migrate). The schema stays small on
    # purpose: 14 pages, which a node under a 64 KiB file-size limit can still create.
    """
    CREATE TABLE jobs_v2 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        series_uid TEXT NOT NULL REFERENCES series(series_uid),
        state TEXT NOT NULL CHECK (state IN ('received', 'queued', 'running', 'done', 'failed',
            'rejected', 'quarantined', 'superseded')),
        reason TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        n_instances_at_queue INTEGER,
        not_before REAL NOT NULL DEFAULT 0,
        supersedes INTEGER,
        reports TEXT
    );
    INSERT INTO jobs_v2 (id, series_uid, state, reason, attempts, created_at, updated_at,
        n_instances_at_queue)
        SELECT id, series_uid, state, reason, attempts, created_at, updated_at,
        n_instances_at_queue FROM jobs;
    DROP TABLE jobs;
    ALTER TABLE jobs_v2 RENAME TO jobs;
    CREATE INDEX jobs_state ON jobs(state, id);
    CREATE INDEX jobs_series ON jobs(series_uid, id);
    CREATE UNIQUE INDEX jobs_open_series ON jobs(series_uid) WHERE state = 'received';
    ALTER TABLE series ADD COLUMN released_at REAL;
    ALTER TABLE series ADD COLUMN interrupted_at REAL;
    UPDATE series SET released_at = last_at;
    """,
    # 3: DICOMweb destinations (STOW-RS) are named by their service URL; NULL for C-STORE peers
    "ALTER TABLE outbox ADD COLUMN dest_url TEXT",
]


class Database:
    """Per-thread connections to one SQLite file, created and migrated on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._migrate()

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a crash of this process (kill -9) but the
            # WAL is fsynced at checkpoints, not per commit. What must survive a power cut is
            # the instance itself: the spool fsyncs every file and its directory before the
            # acknowledgement, and start-up recovery re-indexes any file the index lost.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: one state change, all or nothing."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            # a COMMIT that fails (disk full) leaves the transaction open: roll it back too,
            # or every later BEGIN on this thread's connection fails
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _migrate(self) -> None:
        """Apply the missing migrations in one transaction, on a connection with foreign keys
        off: rebuilding a referenced table (SQLite's 12-step ALTER) needs it; the foreign keys
        are checked before the commit instead."""
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                    for statement in script.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={number}")
                broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise sqlite3.IntegrityError(f"migration broke foreign keys: {broken[:3]}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()


def now() -> float:
    return time.time()
