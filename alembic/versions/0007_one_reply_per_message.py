"""a user message has at most one stored reply, enforced by the database

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

With replicas, one that stalls past REPLICA_LEASE_S just after checking its lease (a frozen VM,
a starved CPU) could wake up and store its reply after another replica had answered the same
message: two replies in the history, both fed to every later prompt. The lease cannot stop a
write already past its check; the database can. A reply that would be a second one is
refused (``DialogueService.store_reply``). Rows stored twice before this revision keep their
text, sent to the user as they were, and only the first stays linked to the message it answers.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "UPDATE messages SET reply_to_id = NULL WHERE reply_to_id IS NOT NULL AND id NOT IN "
        "(SELECT first_id FROM (SELECT min(id) AS first_id FROM messages "
        "WHERE reply_to_id IS NOT NULL GROUP BY reply_to_id) AS firsts)"
    )
    op.drop_index("ix_messages_reply_to_id", table_name="messages")
    op.create_index("uq_messages_reply_to_id", "messages", ["reply_to_id"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_messages_reply_to_id", table_name="messages")
    op.create_index("ix_messages_reply_to_id", "messages", ["reply_to_id"])
