"""messages by time: an index for the owed-replies sweep and for pruning

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

With several replicas (REDIS_URL), each replica looks for recent unanswered messages every
REPLICA_SWEEP_INTERVAL_S; without this index that is a scan of the whole messages table.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_messages_created_at", "messages", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_messages_created_at", table_name="messages")
