"""facts users state about themselves, an index of their messages' words, memory on/off

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

The prompt holds only the latest messages that fit the context: a name said 30 exchanges ago
was gone. Facts a user states about themselves (bot.facts) are kept apart, one value per kind
(a newer statement replaces the older), and reach every prompt while ``memory_enabled``. The
content words of each message (bot.morphology) are indexed in ``message_terms``, so that old
exchanges the window no longer holds can be found again (bot.recall).
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "users",
        sa.Column("memory_enabled", sa.Boolean(), nullable=False, server_default="1"),
    )
    op.create_table(
        "user_facts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.Column(
            "message_id",
            sa.Integer(),
            sa.ForeignKey("messages.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("user_id", "kind", name="uq_user_facts_user_kind"),
    )
    op.create_table(
        "message_terms",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "message_id",
            sa.Integer(),
            sa.ForeignKey("messages.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("term", sa.String(48), nullable=False),
    )
    op.create_index("ix_message_terms_user_term", "message_terms", ["user_id", "term"])
    op.create_index("ix_message_terms_message_id", "message_terms", ["message_id"])


def downgrade() -> None:
    op.drop_index("ix_message_terms_message_id", table_name="message_terms")
    op.drop_index("ix_message_terms_user_term", table_name="message_terms")
    op.drop_table("message_terms")
    op.drop_table("user_facts")
    op.drop_column("users", "memory_enabled")
