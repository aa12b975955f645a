"""The store's tables, defined once for SQLite and PostgreSQL (SQLAlchemy Core metadata).

A new database is created from this metadata and stamped with the newest migration; an
existing one is brought here by the Alembic migrations in store/migrations/ (store/db.py
decides which). A change to a table is therefore two edits that a test holds together: the
table here, and a migration that takes an existing database to it
(tests/test_store_schema.py compares a migrated database with this metadata on both engines).

Per-engine differences are types only: times are 8-byte floats (PostgreSQL's REAL is 4
bytes, which would round epoch seconds to minutes), and ids are BIGINT identities on
PostgreSQL but INTEGER PRIMARY KEY AUTOINCREMENT on SQLite (its rowid alias). The state
CHECKs list the words of JobState and OutboxState.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    false,
    text,
)
from sqlalchemy.dialects.sqlite import REAL

from covid_plugin.store.states import JobState, OutboxState

metadata = MetaData()

# ids and the columns that reference them: the rowid alias on SQLite needs exactly INTEGER
ID = BigInteger().with_variant(Integer(), "sqlite")
# epoch seconds: 8-byte floats on both (SQLite's REAL is 8 bytes, PostgreSQL's only 4)
TIME = Double().with_variant(REAL(), "sqlite")


def _id() -> Column:
    return Column("id", ID, Identity(), primary_key=True)


def _one_of(column: str, states: type[JobState] | type[OutboxState]) -> CheckConstraint:
    words = ", ".join(f"'{state.value}'" for state in states)
    return CheckConstraint(f"{column} IN ({words})")


instances = Table(
    "instances", metadata,
    Column("sop_instance_uid", Text, primary_key=True),
    Column("sop_class_uid", Text, nullable=False),
    Column("series_uid", Text, nullable=False),
    Column("study_uid", Text, nullable=False),
    Column("transfer_syntax", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("size", BigInteger().with_variant(Integer(), "sqlite"), nullable=False),
    Column("calling_ae", Text, nullable=False),
    Column("received_at", TIME, nullable=False),
    Index("instances_series", "series_uid"),
)

series = Table(
    "series", metadata,
    Column("series_uid", Text, primary_key=True),
    Column("study_uid", Text, nullable=False),
    Column("modality", Text, nullable=False),
    Column("sop_class_uid", Text, nullable=False),
    Column("body_part", Text, nullable=False),
    Column("description", Text, nullable=False),
    Column("image_type", Text, nullable=False),
    Column("calling_ae", Text, nullable=False),
    Column("n_instances", Integer, nullable=False),
    Column("first_at", TIME, nullable=False),
    Column("last_at", TIME, nullable=False),
    # when its last association ended normally, or broke off (series.completion)
    Column("released_at", TIME),
    Column("interrupted_at", TIME),
)

jobs = Table(
    "jobs", metadata,
    _id(),
    Column("series_uid", Text, ForeignKey("series.series_uid"), nullable=False),
    Column("state", Text, nullable=False),
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("created_at", TIME, nullable=False),
    Column("updated_at", TIME, nullable=False),
    Column("n_instances_at_queue", Integer),
    Column("not_before", TIME, nullable=False, server_default=text("0")),
    # the job this re-run replaced, and the reports a finished job sent (JSON) for a later
    # re-run to name as predecessors
    Column("supersedes", ID),
    Column("reports", Text),
    Column("lease_owner", Text),
    Column("lease_expires_at", TIME),
    # rejected because its sender broke off and did not resend: a resend opens a new job
    # even when every instance was already held, and health names the series
    Column("incomplete", Boolean(create_constraint=False), nullable=False,
           server_default=false()),
    _one_of("state", JobState),
    Index("jobs_state", "state", "id"),
    Index("jobs_series", "series_uid", "id"),
    # one open (receiving) job per series; the claim queries name the state as a literal,
    # which a partial index needs to be used
    Index("jobs_open_series", "series_uid", unique=True,
          sqlite_where=text("state = 'received'"), postgresql_where=text("state = 'received'")),
    sqlite_autoincrement=True,
)

outbox = Table(
    "outbox", metadata,
    _id(),
    Column("job_id", ID, ForeignKey("jobs.id")),
    Column("path", Text, nullable=False),
    Column("sop_instance_uid", Text, nullable=False),
    Column("dest_ae", Text, nullable=False),
    Column("dest_host", Text, nullable=False),
    Column("dest_port", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", TIME, nullable=False),
    Column("last_error", Text),
    Column("created_at", TIME, nullable=False),
    Column("updated_at", TIME, nullable=False),
    # DICOMweb destinations (STOW-RS) are named by their service URL; NULL for C-STORE peers
    Column("dest_url", Text),
    Column("lease_owner", Text),
    Column("lease_expires_at", TIME),
    _one_of("state", OutboxState),
    Index("outbox_due", "state", "next_attempt_at"),
    sqlite_autoincrement=True,
)

rejected_instances = Table(
    "rejected_instances", metadata,
    _id(),
    Column("sop_instance_uid", Text),
    Column("calling_ae", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("path", Text),
    Column("received_at", TIME, nullable=False),
    sqlite_autoincrement=True,
)

# Every listener's (and worker's) heartbeat, and the open associations of every listener, so
# that series completion is decided from the database rather than one listener's memory.
# WITHOUT ROWID keeps each to one page on SQLite (see SQLiteDatabase._create).
listeners = Table(
    "listeners", metadata,
    Column("listener", Text, primary_key=True),
    Column("heartbeat_at", TIME, nullable=False),
    sqlite_with_rowid=False,
)

open_associations = Table(
    "open_associations", metadata,
    Column("assoc", Text),
    Column("series_uid", Text),
    Column("listener", Text),
    Column("opened_at", TIME),
    PrimaryKeyConstraint("assoc", "series_uid"),
    sqlite_with_rowid=False,
)
