"""Quarantined and superseded jobs, a retry-later time, the reports a finished job sent
(for a re-run to name as predecessors) and the job it replaced, and how each series'
associations ended. Rebuilding `jobs` is SQLite's way to change a CHECK constraint; it
runs with foreign keys off (store/db.py checks them before the commit).

Revision 0002, after 0001. Written before the store used Alembic, when the SQLite schema
was versioned by PRAGMA user_version (2); PostgreSQL support began at 0003, so this
revision only ever runs on SQLite. Never edit a released revision.
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SCRIPT = """
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
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        raise RuntimeError("revision 0002 is SQLite's history: PostgreSQL stores begin at 0003")
    for statement in SCRIPT.split(";"):
        if statement.strip():
            op.execute(statement)
