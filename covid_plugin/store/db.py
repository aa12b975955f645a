"""The store's database: schema, migrations and connections, on SQLite or PostgreSQL.

SQLite (one file in WAL mode) is the embedded default: one node, one machine. PostgreSQL
(`database_url = "postgresql://..."`) lets several listener and worker processes on several
machines share one index, job queue and outbox. Both hold the same schema, defined once in
store/schema.py and brought there by the Alembic revisions in store/migrations/; the SQL in
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
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg.pq import TransactionStatus
from sqlalchemy.pool import NullPool

from covid_plugin.store.schema import metadata

# What a failing store raises, whichever engine: callers catch this, not sqlite3.Error.
STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# The revision a store made before the store used Alembic is at, by its old version number
# (SQLite's PRAGMA user_version, PostgreSQL's schema_version table).
LEGACY_REVISIONS = {1: "0001", 2: "0002", 3: "0003", 4: "0004"}


def _alembic_config(conn: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    return config


def head_revision() -> str | None:
    """The newest migration: where every store is brought at start."""
    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def migrate(conn: sa.Connection, legacy_version: int) -> None:
    """Bring the store behind `conn` to the newest revision, in the caller's transaction.

    A new store is created from schema.metadata, the one definition, and stamped with the
    newest revision; a store from before Alembic (`legacy_version` > 0) is stamped with the
    revision its old version number stands for; then the revisions it lacks run.
    """
    config = _alembic_config(conn)
    if MigrationContext.configure(conn).get_current_revision() is None:
        if legacy_version == 0:
            metadata.create_all(conn)
            command.stamp(config, "head")
            return
        command.stamp(config, LEGACY_REVISIONS[legacy_version])
    command.upgrade(config, "head")


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
        """Bring the file to the newest revision in one BEGIN IMMEDIATE transaction, on a
        connection with foreign keys off: rebuilding a referenced table (SQLite's 12-step
        ALTER, revision 0002) needs it; the foreign keys are checked before the commit
        instead.

        A new file gets 2 KiB pages and a rollback journal (`connection` switches it to WAL
        afterwards): its whole schema, about 20 pages, then goes straight into the file, so
        that a node under a 64 KiB file-size limit still starts and answers.
        """
        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
                conn.execute("PRAGMA page_size=2048")
            conn.execute("PRAGMA foreign_keys=OFF")
            return conn

        engine = sa.create_engine("sqlite://", creator=connect, poolclass=NullPool)
        # the driver is in autocommit mode: SQLAlchemy's transaction is this BEGIN (the
        # recipe in SQLAlchemy's pysqlite notes), so that DDL is transactional too
        sa.event.listen(engine, "begin",
                        lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        try:
            with engine.begin() as conn:
                migrate(conn, conn.exec_driver_sql("PRAGMA user_version").scalar_one())
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise sqlite3.IntegrityError(f"migration broke foreign keys: {broken[:3]}")
        finally:
            engine.dispose()


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
        """Bring the schema to the newest revision in one transaction, under an advisory
        lock, so that processes starting together migrate once and the others wait, then
        see it."""
        engine = sa.create_engine("postgresql+psycopg://", poolclass=NullPool,
                                  creator=lambda: psycopg.connect(self.url))
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": lock_key("covid_plugin.schema")})
                legacy = 0
                if sa.inspect(conn).has_table("schema_version"):
                    legacy = conn.execute(sa.text("SELECT version FROM schema_version")
                                          ).scalar_one_or_none() or 0
                migrate(conn, legacy)
        finally:
            engine.dispose()


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
