"""The store's database: schema, migrations and connections, on SQLite or PostgreSQL.

SQLite (one file in WAL mode) is the embedded default: one node, one machine. PostgreSQL
(`database_url = "postgresql://..."`) lets several listener and worker processes on several
machines share one index, job queue and outbox. Both hold the same schema, and the SQL in
store/ is written once, with `?` placeholders and syntax both accept; this module is the only
place that knows which engine it talks to. Each thread gets its own connection; writers
serialise on SQLite's lock, or on PostgreSQL's row locks (claims use FOR UPDATE SKIP LOCKED,
`Database.skip_locked`).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

# What a failing store raises, whichever engine: callers catch this, not sqlite3.Error.
STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)

# SQLite: each entry upgrades the schema by one version (PRAGMA user_version); never edit an
# entry once released.
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
    # 4: leases, so that several processes can share the queue and the outbox (a worker that
    # dies mid-job loses its lease and another takes the job over), and the open associations
    # of every listener, so that series completion is decided from the database rather than
    # one listener's memory. WITHOUT ROWID keeps each new table to one page: the schema is
    # now 16 pages, exactly 64 KiB, which a new database writes straight into its file
    # (SQLiteDatabase._migrate) so that a node under a 64 KiB file-size limit still starts.
    """
    ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
    ALTER TABLE jobs ADD COLUMN lease_expires_at REAL;
    ALTER TABLE outbox ADD COLUMN lease_owner TEXT;
    ALTER TABLE outbox ADD COLUMN lease_expires_at REAL;
    CREATE TABLE listeners (listener TEXT PRIMARY KEY, heartbeat_at REAL NOT NULL)
        WITHOUT ROWID;
    CREATE TABLE open_associations (assoc TEXT, series_uid TEXT, listener TEXT,
        opened_at REAL, PRIMARY KEY (assoc, series_uid)) WITHOUT ROWID
    """,
]

# PostgreSQL: (version, script). Version 3 is the SQLite schema after migrations 1-3 in one
# step (PostgreSQL support came with version 4); from there each version means the same
# schema on both engines. Times are DOUBLE PRECISION: PostgreSQL's REAL is 4 bytes, which
# would round epoch seconds to minutes. Never edit an entry once released.
PG_MIGRATIONS: list[tuple[int, str]] = [
    (3, """
    CREATE TABLE instances (
        sop_instance_uid TEXT PRIMARY KEY,
        sop_class_uid TEXT NOT NULL,
        series_uid TEXT NOT NULL,
        study_uid TEXT NOT NULL,
        transfer_syntax TEXT NOT NULL,
        path TEXT NOT NULL,
        size BIGINT NOT NULL,
        calling_ae TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL
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
        first_at DOUBLE PRECISION NOT NULL,
        last_at DOUBLE PRECISION NOT NULL,
        released_at DOUBLE PRECISION,
        interrupted_at DOUBLE PRECISION
    );
    CREATE TABLE jobs (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        series_uid TEXT NOT NULL REFERENCES series(series_uid),
        state TEXT NOT NULL CHECK (state IN ('received', 'queued', 'running', 'done', 'failed',
            'rejected', 'quarantined', 'superseded')),
        reason TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        n_instances_at_queue INTEGER,
        not_before DOUBLE PRECISION NOT NULL DEFAULT 0,
        supersedes BIGINT,
        reports TEXT
    );
    CREATE INDEX jobs_state ON jobs(state, id);
    CREATE INDEX jobs_series ON jobs(series_uid, id);
    CREATE UNIQUE INDEX jobs_open_series ON jobs(series_uid) WHERE state = 'received';
    CREATE TABLE outbox (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        job_id BIGINT REFERENCES jobs(id),
        path TEXT NOT NULL,
        sop_instance_uid TEXT NOT NULL,
        dest_ae TEXT NOT NULL,
        dest_host TEXT NOT NULL,
        dest_port INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        last_error TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        dest_url TEXT
    );
    CREATE INDEX outbox_due ON outbox(state, next_attempt_at);
    CREATE TABLE rejected_instances (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        sop_instance_uid TEXT,
        calling_ae TEXT NOT NULL,
        reason TEXT NOT NULL,
        path TEXT,
        received_at DOUBLE PRECISION NOT NULL
    )
    """),
    (4, """
    ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
    ALTER TABLE jobs ADD COLUMN lease_expires_at DOUBLE PRECISION;
    ALTER TABLE outbox ADD COLUMN lease_owner TEXT;
    ALTER TABLE outbox ADD COLUMN lease_expires_at DOUBLE PRECISION;
    CREATE TABLE listeners (listener TEXT PRIMARY KEY,
        heartbeat_at DOUBLE PRECISION NOT NULL);
    CREATE TABLE open_associations (assoc TEXT, series_uid TEXT, listener TEXT,
        opened_at DOUBLE PRECISION, PRIMARY KEY (assoc, series_uid))
    """),
]
SCHEMA_VERSION = len(MIGRATIONS)
assert PG_MIGRATIONS[-1][0] == SCHEMA_VERSION, "every schema version exists on both engines"


def _statements(script: str) -> Iterator[str]:
    return (s for s in script.split(";") if s.strip())


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's advisory locks, from a readable name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class Database(ABC):
    """Per-thread connections to the store, created and migrated on first use.

    `conn.execute(sql, params)` on a connection from `connection()` or `transaction()` takes
    SQL with `?` placeholders and returns a cursor (fetchone, fetchall, rowcount) whose rows
    read by column name and by index; `conn.executemany(sql, rows)` too.
    """

    dialect: str
    # appended to a claim's candidate SELECT: other claimers skip the rows it locked
    skip_locked: str

    @abstractmethod
    def connection(self) -> Any:
        """This thread's connection (autocommit outside `transaction()`)."""

    @abstractmethod
    def transaction(self) -> Any:
        """`with db.transaction() as conn:` one state change, all or nothing."""

    @abstractmethod
    def try_lock(self, conn: Any, name: str) -> bool:
        """Inside a transaction: take the lock `name` until it ends, without waiting; False
        when another transaction holds it. (SQLite: True, its write lock is already held.)"""

    @abstractmethod
    def exclusive(self, name: str) -> Any:
        """`with db.exclusive(name):` work spanning several transactions that only one
        process at a time may do (waits for the holder). SQLite: one node owns the file."""

    @abstractmethod
    def close(self) -> None:
        """Close this thread's connection."""


class SQLiteDatabase(Database):
    """Per-thread connections to one SQLite file."""

    dialect = "sqlite"
    skip_locked = ""  # BEGIN IMMEDIATE: a claim holds the only write lock

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

    def try_lock(self, conn: sqlite3.Connection, name: str) -> bool:
        return True

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        yield

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _migrate(self) -> None:
        """Apply the missing migrations in one transaction, on a connection with foreign keys
        off: rebuilding a referenced table (SQLite's 12-step ALTER) needs it; the foreign keys
        are checked before the commit instead.

        A new database is created with a rollback journal and switched to WAL afterwards:
        its schema then goes straight into the file (16 pages, 64 KiB) instead of into the
        WAL first (16 frames with their headers: just over 64 KiB).
        """
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            if conn.execute("PRAGMA page_count").fetchone()[0] > 0:
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                    for statement in _statements(script):
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
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()


class Row:
    """A PostgreSQL row read like sqlite3.Row: by column name or by index."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: dict[str, int], values: Sequence[Any]) -> None:
        self._names = names
        self._values = values

    def __getitem__(self, key: int | str | slice) -> Any:
        return self._values[self._names[key] if isinstance(key, str) else key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._names)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._names, self._values, strict=True))})"


def _row_factory(cursor: psycopg.Cursor[Any]) -> Any:
    """psycopg row factory (its public protocol) making `Row`s."""
    names = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(names, values)


_QUOTED = re.compile(r"('(?:[^']|'')*')")


@lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """store/'s `?` placeholders as psycopg's `%s`, and every literal % doubled; a `?` inside
    a quoted string (a reason's text) stays a question mark."""
    parts = _QUOTED.split(sql.replace("%", "%%"))
    return "".join(part if part.startswith("'") else part.replace("?", "%s") for part in parts)


class PgConnection:
    """A psycopg connection that takes store/'s SQL: `?` placeholders, `execute` and
    `executemany` returning the cursor.

    A server restart ends every session; the connection learns it only at its next
    statement. A statement outside a transaction that fails on a connection that turns out
    broken ran nowhere: it is run once more on a new connection (`reconnect`).
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self.raw = connect()

    def reconnect(self) -> None:
        self.raw.close()
        self.raw = self._connect()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        idle = self.raw.info.transaction_status == TransactionStatus.IDLE
        try:
            return self.raw.execute(_pg_sql(sql), params)
        except psycopg.OperationalError:
            if not (idle and self.raw.broken):
                raise
        self.reconnect()
        return self.raw.execute(_pg_sql(sql), params)

    def executemany(self, sql: str, rows: Iterator[Sequence[Any]] | Sequence[Sequence[Any]]
                    ) -> psycopg.Cursor[Any]:
        cursor = self.raw.cursor()
        cursor.executemany(_pg_sql(sql), rows)
        return cursor


class PostgresDatabase(Database):
    """Per-thread connections to one PostgreSQL database (psycopg 3), in autocommit mode
    outside `transaction()`. Transactions run at READ COMMITTED, PostgreSQL's default: each
    statement sees what committed before it started, so claims re-check under row and
    advisory locks rather than rely on an earlier read."""

    dialect = "postgresql"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()
        self._migrate()

    def _connect(self) -> PgConnection:
        return PgConnection(lambda: psycopg.connect(self.url, autocommit=True,
                                                    row_factory=_row_factory))

    def connection(self) -> PgConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.raw.closed or conn.raw.broken:  # a server restart, say
            conn = self._local.conn = self._connect()
        return conn

    @contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        """A transaction whose BEGIN finds the connection broken (the server restarted since
        its last use) begins once more on a new connection: nothing of it had run."""
        conn = self.connection()
        with ExitStack() as stack:
            try:
                stack.enter_context(conn.raw.transaction())
            except psycopg.OperationalError:
                if not conn.raw.broken:
                    raise
                conn.reconnect()
                stack.enter_context(conn.raw.transaction())
            yield conn

    def try_lock(self, conn: PgConnection, name: str) -> bool:
        return conn.execute("SELECT pg_try_advisory_xact_lock(?)", (lock_key(name),)
                            ).fetchone()[0]

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        conn, key = self.connection(), lock_key(name)
        conn.execute("SELECT pg_advisory_lock(?)", (key,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(?)", (key,))

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.raw.close()
            self._local.conn = None

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION in one transaction, under an advisory lock, so
        that processes starting together migrate once and the others wait, then see it."""
        conn = self._connect()
        try:
            with conn.raw.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(?)", (lock_key("covid_plugin.schema"),))
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = conn.execute("SELECT version FROM schema_version").fetchone()
                if row is None:
                    conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0 if row is None else row[0]
                for number, script in PG_MIGRATIONS:
                    if number <= version:
                        continue
                    for statement in _statements(script):
                        conn.execute(statement)
                    conn.execute("UPDATE schema_version SET version = ?", (number,))
        finally:
            conn.raw.close()


def open_database(url: str | None, sqlite_path: Path) -> Database:
    """The store for a node: PostgreSQL at `url` (postgresql://...), else SQLite at
    `sqlite_path` (the embedded default)."""
    if url is None:
        return SQLiteDatabase(sqlite_path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    raise ValueError("database_url must start with postgresql:// (or be unset for SQLite)")


def now() -> float:
    return time.time()
