"""Tables: users with their settings, and their messages (the dialogue memory)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The rows of /reset and /forget (``repository.MARKER_ROLES``), spelled out with literals: SQLite
# uses a partial index only for a query whose WHERE holds its condition term for term.
MARKER_ROWS = "role IN ('reset', 'forget')"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    """A Telegram user (or the console's local user); ``temperature`` None means the default."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    telegram_id: Mapped[int] = mapped_column(BigInteger, unique=True, index=True)
    name: Mapped[str | None] = mapped_column(String(256))
    temperature: Mapped[float | None] = mapped_column(Float)
    # /memory off: the facts are kept (and shown by /memory) but left out of the prompt
    memory_enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # With replicas: grown by each grant of the user's lease (bot.replicas, migration 0011)
    lease_token: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class Message(Base):
    """One turn: ``role`` is ``user`` or ``bot``. The index serves "last N of this user".

    Delivery state lives in the rows, not in a process's memory, so a restart (or another
    replica) can tell what is still owed to a user:

    * ``telegram_message_id``: the chat's id of the message a user's turn came from. Telegram
      re-delivers an update it thinks unacknowledged; the unique (chat, message id) pair turns
      the second delivery into a no-op. ``None`` for the console chat.
    * ``telegram_thread_id``: the forum topic the message was written in, where its reply goes
      (whichever replica or restart answers it) and whose conversation it belongs to (a reply
      sees only its topic's history); ``None`` outside topics.
    * ``reply_to_id``: on a bot reply, the user message it answers. A bot reply is stored only
      after Telegram accepted it, so a user message with no reply pointing at it is unanswered;
      a message has at most one (unique), so a replica that lost its lease mid-store cannot
      add a second.
    * ``reply_draft_id``: on a user message, the Telegram id of the bot's message its reply is
      being streamed into, set once the first words went out. Whoever answers the message after
      a crash (a restart, another replica) finishes the reply in that message, rather than
      leaving the cut text on the user's screen above a second, whole one.
    * ``settled_at``: on a user message, when the bot gave up answering it: the user got a
      notice instead (the model busy or too slow), or the chat refuses the bot (blocked, left
      the group). Neither a restart nor a replica's sweep answers it again.
    * ``recalled_ids``: on a user message, the older user messages whose exchanges were
      recalled for it (``bot.recall``; comma-separated ids, "" for none): every later prompt
      holds them right before it again, so the prompt only grows at its end (migration 0010).
    """

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_user_id_id", "user_id", "id"),
        # the user's last /reset or /forget, where each prompt starts (migration 0009)
        Index(
            "ix_messages_markers",
            "user_id",
            "id",
            sqlite_where=text(MARKER_ROWS),
            postgresql_where=text(MARKER_ROWS),
        ),
        # what the owed-replies sweep (every few seconds on each replica) and pruning look up
        Index("ix_messages_created_at", "created_at"),
        UniqueConstraint("user_id", "telegram_message_id", name="uq_messages_user_telegram_id"),
        # one stored reply per user message, whoever stores it (migration 0007 says why)
        Index("uq_messages_reply_to_id", "reply_to_id", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(8))
    text: Mapped[str] = mapped_column(Text)
    telegram_message_id: Mapped[int | None] = mapped_column(BigInteger)
    telegram_thread_id: Mapped[int | None] = mapped_column(BigInteger)
    reply_to_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    reply_draft_id: Mapped[int | None] = mapped_column(BigInteger)
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    recalled_ids: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UserFact(Base):
    """Something a user said about themselves (``bot.facts``): one value per kind, the newest
    statement's, with the message it came from (kept while that message is)."""

    __tablename__ = "user_facts"
    __table_args__ = (UniqueConstraint("user_id", "kind", name="uq_user_facts_user_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    value: Mapped[str] = mapped_column(String(256))
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MessageTerm(Base):
    """One content word of a user's message (``bot.morphology.content_lemmas``): the index
    that finds a user's old exchanges again (``bot.recall``). A plain table, so SQLite and
    PostgreSQL index and search it the same way; scoped by user in every query."""

    __tablename__ = "message_terms"
    __table_args__ = (
        Index("ix_message_terms_user_term", "user_id", "term"),
        # deleting messages (/reset, /forget, pruning) deletes their terms by this
        Index("ix_message_terms_message_id", "message_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    term: Mapped[str] = mapped_column(String(48))
