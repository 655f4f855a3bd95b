"""Small functions that each do one thing with a session the caller owns."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, delete, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from bot.db.models import Message, User

USER_ROLE = "user"
BOT_ROLE = "bot"


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


async def get_or_create_user(session: AsyncSession, telegram_id: int, name: str | None) -> User:
    """The user row for this Telegram id, created on first contact (name kept up to date)."""
    user = await session.scalar(select(User).where(User.telegram_id == telegram_id))
    if user is None:
        user = User(telegram_id=telegram_id, name=name)
        session.add(user)
        await session.flush()
    elif name and user.name != name:
        user.name = name
    return user


async def set_temperature(session: AsyncSession, user: User, value: float | None) -> None:
    user.temperature = value
    await session.flush()


async def add_message(
    session: AsyncSession,
    user: User,
    role: str,
    text: str,
    *,
    telegram_message_id: int | None = None,
    telegram_thread_id: int | None = None,
    reply_to_id: int | None = None,
) -> Message:
    """Add one turn; a second user turn with the same ``telegram_message_id`` raises
    ``IntegrityError`` (the unique constraint that makes a re-delivered update a no-op)."""
    message = Message(
        user_id=user.id,
        role=role,
        text=text,
        telegram_message_id=telegram_message_id,
        telegram_thread_id=telegram_thread_id,
        reply_to_id=reply_to_id,
    )
    session.add(message)
    await session.flush()
    return message


async def has_telegram_message(session: AsyncSession, user: User, telegram_message_id: int) -> bool:
    return bool(
        await session.scalar(
            select(
                exists().where(
                    Message.user_id == user.id,
                    Message.telegram_message_id == telegram_message_id,
                )
            )
        )
    )


@dataclass(frozen=True)
class PendingMessage:
    """A user's Telegram message that has no delivered reply yet."""

    message_id: int
    telegram_id: int
    name: str | None
    thread_id: int | None  # the forum topic it was written in, where its reply goes


async def unanswered_messages(
    session: AsyncSession,
    since: datetime,
    until: datetime | None = None,
    telegram_id: int | None = None,
) -> list[PendingMessage]:
    """Telegram messages stored from ``since`` (to ``until``) that no stored reply answers,
    oldest first; only the user ``telegram_id``'s when given."""
    reply = aliased(Message)
    answered = exists().where(reply.reply_to_id == Message.id)
    query = (
        select(Message.id, User.telegram_id, User.name, Message.telegram_thread_id)
        .join(User, User.id == Message.user_id)
        .where(
            Message.role == USER_ROLE,
            Message.telegram_message_id.is_not(None),
            Message.created_at >= since,
            ~answered,
        )
        .order_by(Message.id)
    )
    if until is not None:
        query = query.where(Message.created_at <= until)
    if telegram_id is not None:
        query = query.where(User.telegram_id == telegram_id)
    rows = await session.execute(query)
    return [PendingMessage(*row) for row in rows.all()]


async def recent_turns(
    session: AsyncSession, user: User, limit: int, up_to_id: int | None = None
) -> list[Turn]:
    """The user's last ``limit`` messages in conversation order, oldest first; with ``up_to_id``,
    only what comes before the reply to that message.

    Conversation order puts each reply right after the message it answers, not where its row
    id falls: a user who writes twice before the first reply is stored (``u1 u2 b1 b2`` by id)
    had the conversation ``u1 b1 u2 b2``, and the reply to ``u2`` follows ``b1``. So the prompt
    never depends on which reply happened to be stored first.
    """
    place = func.coalesce(Message.reply_to_id, Message.id)
    query = select(Message.role, Message.text).where(Message.user_id == user.id)
    if up_to_id is not None:
        query = query.where(
            or_(
                and_(Message.role == USER_ROLE, Message.id <= up_to_id),
                and_(Message.role == BOT_ROLE, place < up_to_id),
            )
        )
    rows = await session.execute(query.order_by(place.desc(), Message.id.desc()).limit(limit))
    return [Turn(role, text) for role, text in reversed(rows.all())]


async def clear_history(session: AsyncSession, user: User) -> int:
    """Forget this user's messages (only theirs); returns how many were deleted."""
    result = await session.execute(delete(Message).where(Message.user_id == user.id))
    return result.rowcount or 0


async def count_messages(session: AsyncSession, user: User) -> int:
    return (
        await session.scalar(
            select(func.count()).select_from(Message).where(Message.user_id == user.id)
        )
        or 0
    )


async def delete_user(session: AsyncSession, telegram_id: int) -> bool:
    """Delete everything stored about this user: their messages and their row."""
    user = await session.scalar(select(User).where(User.telegram_id == telegram_id))
    if user is None:
        return False
    await session.execute(delete(Message).where(Message.user_id == user.id))
    await session.delete(user)
    return True


async def prune_messages(session: AsyncSession, before: datetime) -> int:
    """Delete every message older than ``before`` (the retention period)."""
    result = await session.execute(delete(Message).where(Message.created_at < before))
    return result.rowcount or 0


async def totals(session: AsyncSession) -> tuple[int, int]:
    """(users, messages) in the whole database, for /stats."""
    users = await session.scalar(select(func.count()).select_from(User)) or 0
    messages = await session.scalar(select(func.count()).select_from(Message)) or 0
    return users, messages
