"""One schema definition (store/schema.py): a new store is made from it, and a store written by
an earlier release is migrated to it by the Alembic revisions (store/migrations/), on SQLite
and on a real PostgreSQL server. Alembic's own comparison of a database with the metadata is
the judge, so a table changed in one place and not the other fails here.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from covid_plugin.store.db import (
    MIGRATIONS_DIR,
    Database,
    SQLiteDatabase,
    head_revision,
    open_database,
)
from covid_plugin.store.jobs import JobQueue
from covid_plugin.store.schema import metadata

LEGACY = Path(__file__).parent / "legacy_schemas"


def _engine(db: Database) -> sa.Engine:
    if db.dialect == "sqlite":
        return sa.create_engine("sqlite://", creator=lambda: sqlite3.connect(db.path))
    return sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(db.url))


def differences(db: Database) -> list:
    """What Alembic would change to make the store match schema.metadata (types included)."""
    engine = _engine(db)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()


def revision(db: Database) -> str | None:
    return db.connection().execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_a_new_store_is_the_schema_at_the_newest_revision(db: Database):
    assert differences(db) == []
    assert revision(db) == head_revision() == "0005"


def test_revisions_form_one_line():
    """Two revisions written on two branches would give two heads: a store could then never
    say which schema it has."""
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    assert len(script.get_heads()) == 1
    assert [r.revision for r in script.walk_revisions()] == ["0005", "0004", "0003", "0002",
                                                             "0001"]


def _sqlite_v1(path: Path) -> None:
    """An SQLite store as the first release wrote it (PRAGMA user_version 1), with rows."""
    first = ScriptDirectory(str(MIGRATIONS_DIR)).get_revision("0001").module
    old = sqlite3.connect(path)
    old.executescript(first.SCRIPT)
    old.executescript(
        "PRAGMA user_version=1;"
        "INSERT INTO series VALUES ('1.1', '1', 'CT', '', '', '', '', 'A', 30, 5, 7);"
        "INSERT INTO jobs (series_uid, state, reason, attempts, created_at, updated_at) "
        "VALUES ('1.1', 'done', NULL, 1, 0, 8), ('1.1', 'rejected', "
        "'incomplete: the transfer broke off after 3 instance(s)', 1, 9, 9);"
        "INSERT INTO outbox (job_id, path, sop_instance_uid, dest_ae, dest_host, dest_port, "
        "state, next_attempt_at, created_at, updated_at) "
        "VALUES (1, 'r.dcm', '9.9', 'P', 'h', 104, 'pending', 0, 0, 0);")
    old.close()


def test_a_sqlite_store_from_the_first_release_is_migrated_to_the_schema(tmp_path: Path):
    _sqlite_v1(tmp_path / "db.sqlite")
    db = SQLiteDatabase(tmp_path / "db.sqlite")
    assert differences(db) == []
    assert revision(db) == head_revision()
    conn = db.connection()
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("SELECT released_at FROM series").fetchone()[0] == 7
    queue = JobQueue(db)
    assert [(j.state, j.attempts) for j in queue.all()] == [("done", 1), ("rejected", 1)]
    # the reason prefix the first release used becomes the column
    assert queue.incomplete_series() == ["1.1"]
    with db.transaction() as c:  # the states added since are allowed
        c.execute("UPDATE jobs SET state = 'quarantined' WHERE id = 1")


def test_a_postgresql_store_from_before_alembic_is_migrated_to_the_schema(postgres_url: str,
                                                                          tmp_path: Path):
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute((LEGACY / "postgresql_v4.sql").read_text())
        conn.execute(
            "INSERT INTO series VALUES ('1.1', '1', 'CT', '', '', '', '', 'A', 30, 5, 7, 7, "
            "NULL); INSERT INTO jobs (series_uid, state, reason, created_at, updated_at) "
            "VALUES ('1.1', 'rejected', 'incomplete: the transfer broke off', 9, 9)")
    db = open_database(postgres_url, tmp_path / "unused.sqlite")
    assert differences(db) == []
    assert revision(db) == head_revision()
    assert JobQueue(db).incomplete_series() == ["1.1"]
    with pytest.raises(psycopg.errors.UndefinedTable):  # the old version table is gone
        db.connection().execute("SELECT version FROM schema_version")


def test_a_new_sqlite_store_fits_in_64_kib(tmp_path: Path):
    """A node whose files may not exceed 64 KiB still makes its store, and so starts and
    refuses instances with an answer (test_node_ingest.test_write_error_...)."""
    SQLiteDatabase(tmp_path / "db.sqlite").close()
    assert (tmp_path / "db.sqlite").stat().st_size <= 64 * 1024
