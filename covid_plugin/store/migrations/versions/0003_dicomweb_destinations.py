"""DICOMweb destinations (STOW-RS) are named by their service URL; NULL for C-STORE peers.

Revision 0003, after 0002. PostgreSQL stores made before Alembic begin here: their first
version (3) was SQLite's schema after 0001-0003 in one step. Never edit a released revision.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("dest_url", sa.Text()))
