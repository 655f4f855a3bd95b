"""Small functions that each do one thing with a session the caller owns."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

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


async def add_message(session: AsyncSession, user: User, role: str, text: str) -> Message:
    message = Message(user_id=user.id, role=role, text=text)
    session.add(message)
    await session.flush()
    return message


async def recent_turns(
    session: AsyncSession, user: User, limit: int, up_to_id: int | None = None
) -> list[Turn]:
    """The user's last ``limit`` messages (up to message ``up_to_id`` if given), oldest first."""
    query = select(Message.role, Message.text).where(Message.user_id == user.id)
    if up_to_id is not None:
        query = query.where(Message.id <= up_to_id)
    rows = await session.execute(query.order_by(Message.id.desc()).limit(limit))
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
