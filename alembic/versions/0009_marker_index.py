"""the last /reset or /forget of a user found on an index

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

Every prompt starts after the user's last /reset or /forget. Finding it was a scan of the
user's whole history (a marker is rare, so ``max(id)`` under a role filter read every row back
to the first): 17 ms of a prompt's 30 at 10,000 messages (``benchmarks.memory_latency``). A
partial index holds the markers alone, so it costs nothing to store an ordinary message.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MARKERS = sa.text("role IN ('reset', 'forget')")  # bot.db.models.MARKER_ROWS


def upgrade() -> None:
    op.create_index(
        "ix_messages_markers",
        "messages",
        ["user_id", "id"],
        sqlite_where=MARKERS,
        postgresql_where=MARKERS,
    )


def downgrade() -> None:
    op.drop_index("ix_messages_markers", table_name="messages")
