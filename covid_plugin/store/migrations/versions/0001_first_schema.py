"""The first schema: instances, series, jobs, outbox and rejected instances.

Revision 0001, after nothing. Written before the store used Alembic, when the SQLite schema
was versioned by PRAGMA user_version (1); PostgreSQL support began at 0003, so this
revision only ever runs on SQLite. Never edit a released revision.
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCRIPT = """
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
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        raise RuntimeError("revision 0001 is SQLite's history: PostgreSQL stores begin at 0003")
    for statement in SCRIPT.split(";"):
        if statement.strip():
            op.execute(statement)
