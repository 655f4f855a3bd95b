"""Small functions that each do one thing with a session the caller owns."""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Executable,
    Float,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    cast,
    delete,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.selectable import TableValuedAlias

from bot.db.models import MARKER_ROWS, Message, MessageTerm, User, UserFact

USER_ROLE = "user"
BOT_ROLE = "bot"
# Commands that end a conversation, stored in line with the messages (with replicas,
# bot.replicas): the history a reply sees starts after the last of them before its message,
# and the rows before one are deleted by whoever holds the user's lease. The row itself goes
# with them, so a marker that is still stored is one not carried out yet.
RESET_ROLE = "reset"  # /reset: forget the conversation
FORGET_ROLE = "forget"  # /forget: forget the conversation and the settings
MARKER_ROLES = (RESET_ROLE, FORGET_ROLE)
DIALOGUE_ROLES = (USER_ROLE, BOT_ROLE)


class UserKey(Protocol):
    """What the queries that only scope by user need of one: the row's id (a ``User`` row, or
    the snapshot of one that travels with a message, ``bot.dialogue.StoredUser``)."""

    @property
    def id(self) -> int: ...


@dataclass(frozen=True)
class Turn:
    role: str
    text: str
    place: int | None = None  # the id of the user message it is, or answers
    recalled: tuple[int, ...] = ()  # a user message's recalled exchanges (Message.recalled_ids)


async def get_or_create_user(session: AsyncSession, telegram_id: int, name: str | None) -> User:
    """The user row for this Telegram id, created on first contact (name kept up to date).

    Created with ``INSERT ... ON CONFLICT DO NOTHING`` and read back: a user's first message
    may create the row at the same moment as their first Mini App request or another replica,
    and a plain insert then failed on the unique id (the Telegram update was lost with it).
    PostgreSQL makes the second insert wait for the first to commit, then do nothing."""
    query = select(User).where(User.telegram_id == telegram_id)
    user = await session.scalar(query)
    if user is None:
        make_insert = (
            pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        )
        await session.execute(
            make_insert(User)
            .values(telegram_id=telegram_id, name=name)
            .on_conflict_do_nothing(index_elements=[User.telegram_id])
        )
        user = await session.scalar(query)
        assert user is not None
    if name and user.name != name:
        user.name = name
    return user


async def grant_lease_token(session: AsyncSession, telegram_id: int) -> int:
    """The next fencing token of ``telegram_id``'s lease (``bot.replicas``): one more than any
    granted before, whatever Redis remembers."""
    grant = (
        update(User)
        .where(User.telegram_id == telegram_id)
        .values(lease_token=User.lease_token + 1)
        .returning(User.lease_token)
    )
    token = await session.scalar(grant)
    if token is None:  # nothing stored for this chat yet
        await get_or_create_user(session, telegram_id, None)
        token = await session.scalar(grant)
    assert token is not None
    return token


async def holds_lease_token(session: AsyncSession, telegram_id: int, token: int) -> bool:
    """Whether ``token`` is still ``telegram_id``'s newest fencing token. Asked with a write,
    so the user's row stays locked to the end of the transaction: a grant made meanwhile waits
    for what this transaction stores (PostgreSQL's row lock, SQLite's write lock)."""
    held = (
        update(User)
        .where(User.telegram_id == telegram_id, User.lease_token == token)
        .values(lease_token=token)
        .returning(User.id)
        .execution_options(synchronize_session=False)
    )
    return await session.scalar(held) is not None


async def set_temperature(session: AsyncSession, user: User, value: float | None) -> None:
    user.temperature = value
    await session.flush()


async def add_message(
    session: AsyncSession,
    user: UserKey,
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


@dataclass(frozen=True)
class AddedMessage:
    """A message just stored, with what answering it needs of its author's row."""

    id: int
    user_id: int
    temperature: float | None
    memory_enabled: bool
    name: str | None


# The author's settings, read in the statement that stores the message (RETURNING may hold a
# subquery on both databases; SQLAlchemy renders a correlated one there without the outer table).
_AUTHOR_COLUMNS = (
    literal_column(
        "(SELECT temperature FROM users WHERE users.id = messages.user_id)", Float
    ).label("temperature"),
    literal_column(
        "(SELECT memory_enabled FROM users WHERE users.id = messages.user_id)", Boolean
    ).label("memory_enabled"),
    literal_column("(SELECT name FROM users WHERE users.id = messages.user_id)", String).label(
        "name"
    ),
)


@functools.cache
def _add_message_statement(dialect: str, indexed: bool) -> Executable:
    """The statement :func:`add_message_from` runs, built once per database kind: its values are
    named parameters, so each message only binds them (building the statement anew, with its
    values in it, and computing its cache key cost more than a third of a store's time here).
    ``indexed``: with the message's index words in the same statement (PostgreSQL only)."""
    messages = Message.__table__  # the Core table: an ORM-enabled insert adds its own checks
    author = select(
        User.id,
        bindparam("role", type_=String),
        bindparam("text", type_=String),
        bindparam("telegram_message_id", type_=BigInteger),
        bindparam("telegram_thread_id", type_=BigInteger),
        bindparam("created_at", type_=DateTime(timezone=True)),
    ).where(User.telegram_id == bindparam("telegram_id"))
    columns = ["user_id", "role", "text", "telegram_message_id", "telegram_thread_id", "created_at"]
    statement: Executable = (
        insert(messages)
        .from_select(columns, author)
        .returning(messages.c.id, messages.c.user_id, *_AUTHOR_COLUMNS)
    )
    if indexed:
        added = statement.cte("added")
        word = _words_as_rows(dialect)
        index = _index_rows(
            select(added.c.user_id, added.c.id, word.c.value)
            .select_from(added.join(word, true()))  # one message, each of its words
            .where(added.c.memory_enabled)
        )
        statement = select(added).add_cte(index.cte("indexed"))
    return statement


async def add_message_from(
    session: AsyncSession,
    telegram_id: int,
    role: str,
    text: str,
    *,
    telegram_message_id: int | None = None,
    telegram_thread_id: int | None = None,
    terms: Collection[str] = (),
) -> AddedMessage | None:
    """Add a turn of the user (or chat) with this Telegram id in **one** statement that also
    returns their settings: ``None`` when no row exists for them yet (their first message:
    :func:`get_or_create_user`, then again). ``terms``: its index words (:func:`index_terms`),
    kept if the author's memory is on; on PostgreSQL in the same statement (a data-modifying
    ``WITH``), on SQLite, which has none, in a second one.

    Why: storing every incoming message reads the user row anyway; reading it apart, adding the
    message through the ORM, then its words, cost two or three more trips to the database per
    message (measured against that way: ``benchmarks.memory_latency``). A second user turn
    with the same ``telegram_message_id`` raises ``IntegrityError`` as :func:`add_message`."""
    words = _index_words(terms)
    dialect = session.get_bind().dialect.name
    together = bool(words) and dialect == "postgresql"
    values = {
        "telegram_id": telegram_id,
        "role": role,
        "text": text,
        "telegram_message_id": telegram_message_id,
        "telegram_thread_id": telegram_thread_id,
        "created_at": datetime.now(UTC),
    }
    if together:
        values["words"] = words
    statement = _add_message_statement(dialect, together)
    row = (await session.execute(statement, values)).one_or_none()
    if row is None:
        return None
    message = AddedMessage(row.id, row.user_id, row.temperature, bool(row.memory_enabled), row.name)
    if words and not together and message.memory_enabled:
        await _insert_index_words(session, message.user_id, message.id, words)
    return message


async def rename_user(session: AsyncSession, user: UserKey, name: str) -> None:
    """The name Telegram now gives this user (they changed it)."""
    await session.execute(update(User).where(User.id == user.id).values(name=name))


async def has_reply(session: AsyncSession, message_id: int) -> bool:
    """Whether a reply to message ``message_id`` is stored."""
    return bool(await session.scalar(select(exists().where(Message.reply_to_id == message_id))))


async def stored_message_id(
    session: AsyncSession, user: User, telegram_message_id: int
) -> int | None:
    """The id of the row stored for the user's Telegram message, if one is."""
    return await session.scalar(
        select(Message.id).where(
            Message.user_id == user.id, Message.telegram_message_id == telegram_message_id
        )
    )


async def has_telegram_message(session: AsyncSession, user: User, telegram_message_id: int) -> bool:
    return await stored_message_id(session, user, telegram_message_id) is not None


@dataclass(frozen=True)
class PendingMessage:
    """A user's Telegram message that has no delivered reply yet, or a /reset or /forget not
    carried out yet (``role``)."""

    message_id: int
    telegram_id: int
    name: str | None
    thread_id: int | None  # the forum topic it was written in, where its reply goes
    role: str
    draft_id: int | None  # the bot's message an earlier attempt was streaming its reply into
    telegram_message_id: int | None  # in its chat, which a reply may quote; None: the page's
    user_id: int  # the author's row: what answering it needs of the user comes with it
    temperature: float | None
    memory_enabled: bool


async def unanswered_messages(
    session: AsyncSession,
    since: datetime,
    until: datetime | None = None,
    telegram_id: int | None = None,
    from_id: int | None = None,
    pages_since: datetime | None = None,
) -> list[PendingMessage]:
    """Telegram messages stored from ``since`` (to ``until``), or with an id of at least
    ``from_id``, that no stored reply answers and that were not settled (:func:`settle`), and
    the markers not carried out yet whatever their age (a /reset is never dropped for being
    late), oldest first; only the user ``telegram_id``'s when given. ``pages_since``: the
    messages typed on the Mini App's page from then on that are waiting for their answer
    too (``telegram_message_id`` None: only the page's request answers them, and a Telegram
    message stored after one waits for it)."""
    reply = aliased(Message)
    answered = exists().where(reply.reply_to_id == Message.id)
    recent = Message.created_at >= since
    if from_id is not None:
        recent = or_(recent, Message.id >= from_id)
    owed_here = and_(Message.telegram_message_id.is_not(None), recent)
    if pages_since is not None:
        owed_here = or_(
            owed_here,
            and_(Message.telegram_message_id.is_(None), Message.created_at >= pages_since),
        )
    query = (
        select(
            Message.id,
            User.telegram_id,
            User.name,
            Message.telegram_thread_id,
            Message.role,
            Message.reply_draft_id,
            Message.telegram_message_id,
            User.id,
            User.temperature,
            User.memory_enabled,
        )
        .join(User, User.id == Message.user_id)
        .where(
            or_(
                and_(Message.role == USER_ROLE, owed_here, ~answered, Message.settled_at.is_(None)),
                and_(Message.role.in_(MARKER_ROLES), Message.telegram_message_id.is_not(None)),
            ),
        )
        .order_by(Message.id)
    )
    if until is not None:
        query = query.where(Message.created_at <= until)
    if telegram_id is not None:
        query = query.where(User.telegram_id == telegram_id)
    rows = await session.execute(query)
    return [PendingMessage(*row) for row in rows.all()]


async def wrote_after(session: AsyncSession, message_id: int) -> bool:
    """Whether the author of message ``message_id`` has written anything since it."""
    author = select(Message.user_id).where(Message.id == message_id).scalar_subquery()
    later = select(Message.id).where(
        Message.user_id == author, Message.id > message_id, Message.role != BOT_ROLE
    )
    return (await session.execute(select(exists(later)))).scalar_one()


async def settle(session: AsyncSession, message_id: int, at: datetime) -> None:
    """The bot gave up answering message ``message_id`` (a notice was sent instead, or the chat
    refuses the bot): it is owed no more, and the message its reply was streamed into is none."""
    await session.execute(
        update(Message).where(Message.id == message_id).values(settled_at=at, reply_draft_id=None)
    )


async def edit_user_message(
    session: AsyncSession, telegram_id: int, telegram_message_id: int, text: str
) -> int | None:
    """Replace the text of the user message Telegram knows as ``telegram_message_id`` in chat
    ``telegram_id``; its stored id, or None when no such message is stored (never addressed to
    the bot, forgotten, pruned)."""
    chat = select(User.id).where(User.telegram_id == telegram_id).scalar_subquery()
    return await session.scalar(
        update(Message)
        .where(
            Message.user_id == chat,
            Message.role == USER_ROLE,
            Message.telegram_message_id == telegram_message_id,
        )
        .values(text=text)
        .returning(Message.id)
    )


async def set_reply_draft(session: AsyncSession, message_id: int, telegram_message_id: int) -> None:
    """Note the Telegram message the reply to ``message_id`` is being streamed into."""
    await session.execute(
        update(Message).where(Message.id == message_id).values(reply_draft_id=telegram_message_id)
    )


async def keep_sent_draft(session: AsyncSession, message_id: int, telegram_message_id: int) -> None:
    """Note ``telegram_message_id`` as the reply's message only while the message is still
    unanswered and no other is noted: what a replica that lost its lease may still record of
    a message it sent (it exists in the user's chat; the holder writes its reply into it)."""
    reply = aliased(Message)
    await session.execute(
        update(Message)
        .where(
            Message.id == message_id,
            Message.reply_draft_id.is_(None),
            Message.settled_at.is_(None),
            ~exists().where(reply.reply_to_id == Message.id),
        )
        .values(reply_draft_id=telegram_message_id)
    )


async def reply_draft(session: AsyncSession, message_id: int) -> int | None:
    """The Telegram message noted for the reply to ``message_id``, if any."""
    return await session.scalar(select(Message.reply_draft_id).where(Message.id == message_id))


async def recent_turns(
    session: AsyncSession,
    user: UserKey,
    limit: int,
    up_to_id: int | None = None,
    thread_id: int | None = None,
) -> list[Turn]:
    """The user's last ``limit`` messages in conversation order, oldest first; with ``up_to_id``,
    only what comes before the reply to that message.

    Only the conversation of one forum topic, ``thread_id`` (None: outside topics, the General
    topic included): a reply belongs to the topic of the message it answers. A forum group
    talks about different things in different topics, and one topic's history in another's
    prompt made the bot answer out of context.

    Conversation order puts each reply right after the message it answers, not where its row
    id falls: a user who writes twice before the first reply is stored (``u1 u2 b1 b2`` by id)
    had the conversation ``u1 b1 u2 b2``, and the reply to ``u2`` follows ``b1``. So the prompt
    never depends on which reply happened to be stored first.

    The history starts after the last /reset or /forget stored before ``up_to_id`` (carried
    out or not yet): a message sent after /reset never sees what came before it. A /reset
    counts in its own topic only; /forget everywhere.
    """
    place = func.coalesce(Message.reply_to_id, Message.id)
    last_marker = select(func.max(Message.id)).where(
        Message.user_id == user.id,
        sql_text(MARKER_ROWS),  # as the partial index says it, so that it is used
        or_(
            Message.role == FORGET_ROLE,
            and_(
                Message.role == RESET_ROLE,
                Message.telegram_thread_id.is_not_distinct_from(thread_id),
            ),
        ),
    )
    if up_to_id is not None:
        last_marker = last_marker.where(Message.id < up_to_id)
    # A lower bound on the ids worth sorting, found on the (user_id, id) index: the
    # ``limit``-th newest user message of this conversation. Those ``limit`` messages sort
    # by their own ids, so no row of the answer has a place (nor an id) below it. Without
    # it the database sorted every message the user ever sent (30 ms at 10,000 messages).
    oldest_needed = select(Message.id).where(
        Message.user_id == user.id,
        Message.role == USER_ROLE,
        Message.id > func.coalesce(last_marker.scalar_subquery(), 0),
        Message.telegram_thread_id.is_not_distinct_from(thread_id),
    )
    if up_to_id is not None:
        oldest_needed = oldest_needed.where(Message.id <= up_to_id)
    oldest_needed = oldest_needed.order_by(Message.id.desc()).offset(limit - 1).limit(1)
    # Both bounds first, as values: given them, PostgreSQL plans a scan of a few rows on the
    # user's index; given subqueries, it planned for a third of the table, in parallel workers
    # whose start cost more than the scan (10 ms).
    marker, oldest = (
        await session.execute(
            select(last_marker.scalar_subquery(), oldest_needed.scalar_subquery())
        )
    ).one()
    answered = aliased(Message)
    topic = func.coalesce(Message.telegram_thread_id, answered.telegram_thread_id)
    query = (
        select(Message.role, Message.text, place, Message.recalled_ids)
        .outerjoin(answered, answered.id == Message.reply_to_id)
        .where(
            Message.user_id == user.id,
            Message.role.in_(DIALOGUE_ROLES),
            Message.id >= (oldest or 0),
            place > (marker or 0),
            topic.is_not_distinct_from(thread_id),
        )
    )
    if up_to_id is not None:
        query = query.where(
            or_(
                and_(Message.role == USER_ROLE, Message.id <= up_to_id),
                and_(Message.role == BOT_ROLE, place < up_to_id),
            )
        )
    rows = await session.execute(query.order_by(place.desc(), Message.id.desc()).limit(limit))
    return [
        Turn(role, text, at, _ids(recalled)) for role, text, at, recalled in reversed(rows.all())
    ]


def _ids(joined: str | None) -> tuple[int, ...]:
    return tuple(int(i) for i in joined.split(",") if i) if joined else ()


async def set_recalled(session: AsyncSession, message_id: int, recalled: Sequence[int]) -> None:
    """Keep which older messages' exchanges were recalled for user message ``message_id``
    (every later prompt holds them before it again)."""
    await session.execute(
        update(Message)
        .where(Message.id == message_id)
        .values(recalled_ids=",".join(str(i) for i in recalled))
    )


async def topics(session: AsyncSession, telegram_id: int) -> list[int]:
    """The forum topics this chat has messages in (each has its own cached dialogue)."""
    rows = await session.scalars(
        select(Message.telegram_thread_id)
        .join(User, User.id == Message.user_id)
        .where(User.telegram_id == telegram_id, Message.telegram_thread_id.is_not(None))
        .distinct()
    )
    return [int(topic) for topic in rows.all() if topic is not None]


def _in_topic(user: User, thread_id: int | None) -> Select[tuple[int]]:
    """The ids of this chat's rows in forum topic ``thread_id`` (None: outside topics, which is
    every row of a chat without topics). A reply is stored without a topic: it is in the topic
    of the message it answers."""
    answered = aliased(Message)
    topic = func.coalesce(Message.telegram_thread_id, answered.telegram_thread_id)
    return (
        select(Message.id)
        .outerjoin(answered, answered.id == Message.reply_to_id)
        .where(Message.user_id == user.id, topic.is_not_distinct_from(thread_id))
    )


async def clear_history(session: AsyncSession, user: User, thread_id: int | None = None) -> int:
    """Forget this user's conversation (only theirs): in a forum group, only that of topic
    ``thread_id``, where /reset was sent (the others are other conversations). Returns how
    many messages were deleted."""
    result = await session.execute(
        delete(Message)
        .where(Message.id.in_(_in_topic(user, thread_id)))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0


async def carry_out_marker(session: AsyncSession, user: User, marker_id: int, role: str) -> int:
    """Delete the conversation up to the marker ``marker_id`` (the marker too), for /reset;
    for /forget also the settings, and the user's row when nothing written since is left.
    Returns how many messages were deleted.

    Everything placed before the marker goes: its messages, the replies to them (whenever
    those were stored), and earlier markers; for /reset only in the marker's forum topic
    (:func:`clear_history`).
    """
    place = func.coalesce(Message.reply_to_id, Message.id)
    gone = delete(Message).where(Message.user_id == user.id, place <= marker_id)
    if role == RESET_ROLE:
        topic = select(Message.telegram_thread_id).where(Message.id == marker_id)
        gone = gone.where(Message.id.in_(_in_topic(user, await session.scalar(topic))))
    result = await session.execute(gone.execution_options(synchronize_session=False))
    if role == FORGET_ROLE:
        await session.execute(delete(UserFact).where(UserFact.user_id == user.id))
        if await count_messages(session, user) == 0:
            await session.delete(user)
        else:  # the user wrote again after /forget: keep those, drop what they had set
            user.temperature = None
    return result.rowcount or 0


async def count_messages(session: AsyncSession, user: User) -> int:
    return (
        await session.scalar(
            select(func.count()).select_from(Message).where(Message.user_id == user.id)
        )
        or 0
    )


async def delete_user(session: AsyncSession, telegram_id: int) -> bool:
    """Delete everything stored about this user: their messages, facts and row."""
    user = await session.scalar(select(User).where(User.telegram_id == telegram_id))
    if user is None:
        return False
    await session.execute(delete(UserFact).where(UserFact.user_id == user.id))
    await session.execute(delete(MessageTerm).where(MessageTerm.user_id == user.id))
    await session.execute(delete(Message).where(Message.user_id == user.id))
    await session.delete(user)
    return True


async def move_chat(session: AsyncSession, from_telegram_id: int, to_telegram_id: int) -> bool:
    """Carry a chat's memory and settings over to its new id (a group upgraded to a
    supergroup gets a new chat id). The old chat's Telegram message ids mean nothing in the new
    one (and could collide with its new messages', which would then pass for re-deliveries),
    so they are dropped: those messages count as history, no longer as owed. When the new id
    already has a row (someone wrote there first), the old history is put under it and comes
    first, by id. False when the old chat has nothing stored."""
    old = await session.scalar(select(User).where(User.telegram_id == from_telegram_id))
    if old is None:
        return False
    await session.execute(
        update(Message)
        .where(Message.user_id == old.id)
        .values(telegram_message_id=None, telegram_thread_id=None, reply_draft_id=None)
    )
    new = await session.scalar(select(User).where(User.telegram_id == to_telegram_id))
    if new is None:
        old.telegram_id = to_telegram_id
        return True
    await session.execute(update(Message).where(Message.user_id == old.id).values(user_id=new.id))
    if new.temperature is None:
        new.temperature = old.temperature
    await session.delete(old)
    return True


async def prune_messages(session: AsyncSession, before: datetime) -> int:
    """Delete every message older than ``before`` (the retention period)."""
    result = await session.execute(delete(Message).where(Message.created_at < before))
    return result.rowcount or 0


async def totals(session: AsyncSession) -> tuple[int, int]:
    """(users, messages) in the whole database, for /stats: messages of the dialogues, not the
    /reset and /forget markers waiting in line (with replicas) to be carried out."""
    users = await session.scalar(select(func.count()).select_from(User)) or 0
    messages = (
        await session.scalar(
            select(func.count()).select_from(Message).where(Message.role.in_(DIALOGUE_ROLES))
        )
        or 0
    )
    return users, messages


async def remember_facts(
    session: AsyncSession, user: UserKey, facts: Sequence[tuple[str, str]], message_id: int
) -> int:
    """Keep each (kind, value) the user stated in message ``message_id``; a kind already known
    takes the new value (the newer statement supersedes the older). Returns how many changed."""
    changed = 0
    for kind, value in facts:
        row = await session.scalar(
            select(UserFact).where(UserFact.user_id == user.id, UserFact.kind == kind)
        )
        if row is None:
            session.add(UserFact(user_id=user.id, kind=kind, value=value, message_id=message_id))
            changed += 1
        elif row.value != value:
            row.value, row.message_id, row.updated_at = value, message_id, datetime.now(UTC)
            changed += 1
    await session.flush()
    return changed


async def user_facts(session: AsyncSession, user: UserKey) -> list[UserFact]:
    """What the user told the bot about themselves, oldest statement first."""
    rows = await session.scalars(
        select(UserFact).where(UserFact.user_id == user.id).order_by(UserFact.id)
    )
    return list(rows)


async def forget_fact(session: AsyncSession, telegram_id: int, fact_id: int) -> bool:
    """Delete fact ``fact_id`` if it is this Telegram user's (or chat's); False otherwise (a
    button pressed twice, or someone else's fact id)."""
    owner = select(User.id).where(User.telegram_id == telegram_id).scalar_subquery()
    result = await session.execute(
        delete(UserFact).where(UserFact.id == fact_id, UserFact.user_id == owner)
    )
    return bool(result.rowcount)


async def set_memory_enabled(session: AsyncSession, user: User, enabled: bool) -> None:
    user.memory_enabled = enabled
    await session.flush()


async def index_terms(
    session: AsyncSession, user: UserKey, message_id: int, terms: Iterable[str]
) -> None:
    """Index message ``message_id`` under its content words (``bot.recall`` finds it by them).
    One statement that inserts every word from a JSON array (SQLite's ``json_each``,
    PostgreSQL's ``json_array_elements_text``: both name the element ``value``), executed once:
    the ORM's unit of work per row, and then an ``executemany`` of one row per word, each cost
    more than the insert itself (measured: ``benchmarks.memory_latency``)."""
    words = _index_words(terms)
    if words:
        await _insert_index_words(session, user.id, message_id, words)


def _index_words(terms: Iterable[str]) -> str | None:
    """Index words as the JSON array both databases expand into rows (cut to the column)."""
    words = [term[:48] for term in terms]
    return json.dumps(words, ensure_ascii=False) if words else None


def _words_as_rows(dialect: str) -> TableValuedAlias:
    """The JSON array of the parameter ``words`` as rows of one column, ``value``: SQLite's
    ``json_each`` and PostgreSQL's ``json_array_elements_text`` both name it so."""
    words = bindparam("words", type_=String)
    if dialect == "postgresql":
        return func.json_array_elements_text(cast(words, JSON)).table_valued("value")
    return func.json_each(words).table_valued("value")


def _index_rows(rows: Select) -> Insert:
    """Insert (user id, message id, word) ``rows`` into the index."""
    return insert(MessageTerm.__table__).from_select(["user_id", "message_id", "term"], rows)


@functools.cache
def _index_words_statement(dialect: str) -> Insert:
    """One message's index words (the parameters ``user_id``, ``message_id``, ``words``),
    built once per database kind as :func:`_add_message_statement` is."""
    word = _words_as_rows(dialect)
    ids = bindparam("user_id", type_=Integer), bindparam("message_id", type_=Integer)
    return _index_rows(select(*ids, word.c.value))


async def _insert_index_words(
    session: AsyncSession, user_id: int, message_id: int, words: str
) -> None:
    statement = _index_words_statement(session.get_bind().dialect.name)
    await session.execute(statement, {"user_id": user_id, "message_id": message_id, "words": words})


async def forget_message_memory(session: AsyncSession, user: UserKey, message_id: int) -> None:
    """Drop what message ``message_id`` taught memory (the facts it stated, its index words):
    an edit replaces them with what the new text says."""
    await session.execute(
        delete(UserFact).where(UserFact.user_id == user.id, UserFact.message_id == message_id)
    )
    await session.execute(
        delete(MessageTerm).where(
            MessageTerm.user_id == user.id, MessageTerm.message_id == message_id
        )
    )


async def indexed_messages(session: AsyncSession, user: UserKey) -> int:
    """How many of the user's messages recall searches: their own (every other one stored is
    a reply), at least 1."""
    messages = await session.scalar(select(func.count()).where(Message.user_id == user.id))
    return max((messages or 0) // 2, 1)


@dataclass(frozen=True)
class TermHits:
    """What the index knows of some words, for one user: how many of the user's indexed
    messages hold each word (``df``), how many messages are indexed (``indexed``), and which
    words each older message holds (``hits``)."""

    df: dict[str, int]
    indexed: int
    hits: dict[int, set[str]]


async def term_hits(
    session: AsyncSession,
    user: UserKey,
    terms: Collection[str],
    before_id: int,
    indexed: int | None = None,
    max_share: float = 0.05,
) -> TermHits:
    """The user's messages older than ``before_id`` holding any of ``terms``. A word held by
    more than ``max_share`` of the user's messages (and more than 5) is counted but its
    messages are not kept: it tells nothing apart. One query, on the index scoped to the
    user; ``indexed``, the user's message count (:func:`indexed_messages`) if the caller knows
    it: counting is a scan of the user's rows (3 ms at 10,000 on PostgreSQL) and only weighs
    words, so an estimate minutes old serves as well."""
    if not terms:
        return TermHits({}, 0, {})
    if indexed is None:
        indexed = await indexed_messages(session, user)
    rows = (
        await session.execute(
            select(MessageTerm.message_id, MessageTerm.term).where(
                MessageTerm.user_id == user.id, MessageTerm.term.in_(sorted(terms))
            )
        )
    ).all()
    max_df = max(5, int(indexed * max_share))
    by_term: dict[str, list[int]] = {}
    for message_id, term in rows:
        by_term.setdefault(term, []).append(message_id)
    hits: dict[int, set[str]] = {}
    for term, message_ids in by_term.items():
        if len(message_ids) <= max_df:
            for message_id in message_ids:
                if message_id < before_id:
                    hits.setdefault(message_id, set()).add(term)
    df = {term: len(message_ids) for term, message_ids in by_term.items()}
    return TermHits(df, indexed, hits)


async def exchanges(
    session: AsyncSession, user: UserKey, message_ids: Collection[int]
) -> dict[int, tuple[str, str | None]]:
    """Each of the user's messages ``message_ids`` with the reply stored to it (None if none)."""
    if not message_ids:
        return {}
    reply = aliased(Message)
    rows = await session.execute(
        select(Message.id, Message.text, reply.text)
        .outerjoin(reply, reply.reply_to_id == Message.id)
        .where(Message.user_id == user.id, Message.id.in_(sorted(message_ids)))
    )
    return {message_id: (text_, answer) for message_id, text_, answer in rows.all()}


@dataclass(frozen=True)
class ShownMessage:
    """A message of the user's conversation as the Mini App lists it."""

    id: int
    role: str
    text: str
    created_at: datetime


async def conversation_page(
    session: AsyncSession, telegram_id: int, before_id: int | None, limit: int
) -> list[ShownMessage]:
    """The newest ``limit`` messages of ``telegram_id``'s conversation older than
    ``before_id``, newest first: what Telegram and the page both continue (the chat's main
    thread, user messages and replies; markers not carried out yet are not shown)."""
    query = (
        select(Message.id, Message.role, Message.text, Message.created_at)
        .join(User, User.id == Message.user_id)
        .where(
            User.telegram_id == telegram_id,
            Message.role.in_(DIALOGUE_ROLES),
            Message.telegram_thread_id.is_(None),
        )
        .order_by(Message.id.desc())
        .limit(limit)
    )
    if before_id is not None:
        query = query.where(Message.id < before_id)
    return [ShownMessage(*row) for row in (await session.execute(query)).all()]


async def last_page_exchange(session: AsyncSession, telegram_id: int) -> tuple[int, int | None]:
    """The newest message of ``telegram_id``'s conversation when it is a user message typed in
    the Mini App (no Telegram message id), answered or not: (its id, its reply's id or None).
    ``(0, None)`` when the newest exchange is not one the page may regenerate (a Telegram
    message's reply is on the user's screen in Telegram and stays what it is)."""
    newest = (
        select(Message.id, Message.role, Message.telegram_message_id, Message.reply_to_id)
        .join(User, User.id == Message.user_id)
        .where(User.telegram_id == telegram_id, Message.telegram_thread_id.is_(None))
        .order_by(Message.id.desc())
        .limit(2)
    )
    rows = (await session.execute(newest)).all()
    if rows and rows[0].role == BOT_ROLE and len(rows) == 2 and rows[0].reply_to_id == rows[1].id:
        asked, reply_id = rows[1], rows[0].id
    elif rows and rows[0].role == USER_ROLE:
        asked, reply_id = rows[0], None
    else:
        return 0, None
    if asked.role != USER_ROLE or asked.telegram_message_id is not None:
        return 0, None
    return asked.id, reply_id


async def delete_reply(session: AsyncSession, reply_id: int) -> None:
    """Delete one stored reply (the page's Regenerate): its message is owed a reply again."""
    await session.execute(delete(Message).where(Message.id == reply_id))
