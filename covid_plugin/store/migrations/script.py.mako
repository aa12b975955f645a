"""${message}

Revision ${up_revision}, after ${down_revision | comma,n}. Never edit a released revision: add
one, and change store/schema.py to match (tests/test_store_schema.py compares them).
"""

import sqlalchemy as sa
from alembic import op

${imports if imports else ""}
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}
