"""Leases, so that several processes can share the queue and the outbox (a worker that dies
mid-job loses its lease and another takes the job over), and the open associations of every
listener, so that series completion is decided from the database rather than one listener's
memory. WITHOUT ROWID keeps each new table to one page on SQLite.

Revision 0004, after 0003: the last version written before the store used Alembic (PRAGMA
user_version 4 on SQLite, schema_version 4 on PostgreSQL). Never edit a released revision.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


# epoch seconds, as store/schema.py's TIME (a later change there is a revision of its own)
TIME = sa.Double().with_variant(sa.REAL(), "sqlite")


def upgrade() -> None:
    for table in ("jobs", "outbox"):
        op.add_column(table, sa.Column("lease_owner", sa.Text()))
        op.add_column(table, sa.Column("lease_expires_at", TIME))
    op.create_table("listeners",
                    sa.Column("listener", sa.Text(), primary_key=True),
                    sa.Column("heartbeat_at", TIME, nullable=False),
                    sqlite_with_rowid=False)
    op.create_table("open_associations",
                    sa.Column("assoc", sa.Text()),
                    sa.Column("series_uid", sa.Text()),
                    sa.Column("listener", sa.Text()),
                    sa.Column("opened_at", TIME),
                    sa.PrimaryKeyConstraint("assoc", "series_uid"),
                    sqlite_with_rowid=False)
