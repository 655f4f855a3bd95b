"""delivery state: the Telegram message a turn came from, and the message a reply answers

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Rows written before this revision get their links back: each bot reply answers the newest user
message before it, so an old, answered message is never taken for an unanswered one.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("telegram_message_id", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("reply_to_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_messages_reply_to_id", "messages", ["reply_to_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_unique_constraint(
            "uq_messages_user_telegram_id", ["user_id", "telegram_message_id"]
        )
        batch.create_index("ix_messages_reply_to_id", ["reply_to_id"])
    op.execute(
        "UPDATE messages SET reply_to_id = ("
        " SELECT max(earlier.id) FROM messages earlier"
        " WHERE earlier.user_id = messages.user_id AND earlier.role = 'user'"
        " AND earlier.id < messages.id"
        ") WHERE role = 'bot'"
    )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_reply_to_id")
        batch.drop_constraint("uq_messages_user_telegram_id", type_="unique")
        batch.drop_constraint("fk_messages_reply_to_id", type_="foreignkey")
        batch.drop_column("reply_to_id")
        batch.drop_column("telegram_message_id")
