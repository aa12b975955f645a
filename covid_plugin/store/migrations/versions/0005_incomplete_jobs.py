"""A job rejected because its sender broke off and did not resend is marked `incomplete`
(until now its reason began with the word), and PostgreSQL's pre-Alembic version table goes.

On SQLite, the text primary keys of `instances` and `series` become NOT NULL, as they always
were on PostgreSQL: a rowid table's TEXT PRIMARY KEY admits NULL in SQLite. The node never
wrote one; the tables are rebuilt (Alembic's batch mode) so that every store is the schema.

Revision 0005, after 0004, the first written with Alembic. Never edit a released revision.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("incomplete", sa.Boolean(create_constraint=False),
                                    nullable=False, server_default=sa.false()))
    op.execute("UPDATE jobs SET incomplete = TRUE "
               "WHERE state = 'rejected' AND reason LIKE 'incomplete%'")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TABLE IF EXISTS schema_version")
        return
    for table, key in (("instances", "sop_instance_uid"), ("series", "series_uid")):
        with op.batch_alter_table(table) as batch:
            batch.alter_column(key, existing_type=sa.Text(), nullable=False)
