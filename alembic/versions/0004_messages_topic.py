"""messages remember their forum topic, so an owed reply goes back to it

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24

A reply owed after a restart, or answered by another replica's sweep, was sent to the chat's
general topic: only the handler that took the update knew the message's topic. Rows written
before this revision have none (their replies, if still owed, go to the chat as before).
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("telegram_thread_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("telegram_thread_id")
