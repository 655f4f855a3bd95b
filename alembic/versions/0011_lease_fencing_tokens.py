"""each user's lease carries a fencing token kept in the database

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

With replicas a user's lease is a Redis lock. A replica that stalled past it, or whose lock
Redis forgot (a restart, a failover), could go on sending and storing while another replica
answered the same messages. Each grant of the lease now increments ``users.lease_token``; a
reply, its draft, a settled mark and a /reset are stored only in a transaction that finds the
token it was granted still current, and each Bot API call of a reply checks it first
(``bot.replicas``). The counter lives here, not in Redis, so losing Redis's data never hands
out a token that was already given.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("lease_token", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("lease_token")
