"""messages remember the Telegram message their reply is being streamed into

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24

After a crash mid-reply the user had the cut, streamed text on screen, and the restarted bot sent
the whole reply as a second message below it. With the draft's id stored beside the message, the
reply is finished in the message the user already has. Replicas kept this id in Redis, for an
hour at most; now every deployment keeps it here.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("reply_draft_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("reply_draft_id")
