"""messages the bot gave up answering are marked in the database

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24

A message answered with a notice (the model busy or too slow), or whose chat refuses the bot, was
marked settled in Redis, for replicas only and for an hour at most; a single bot answered it again
at its next start (and generated a reply for a user who had blocked it at every start). Rows
written before this revision are not settled: as before, a restart may answer them.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("settled_at")
