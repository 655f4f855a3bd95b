"""The dialogue service: one user's message in, the bot's reply out, memory kept in the database.

Order of work, chosen so that a crash loses nothing the user wrote and owes nothing it cannot
find again: store the user's message (committed, with its Telegram message id) → read recent
history → build the prompt within the token budget → generate → the caller delivers the reply →
:meth:`DialogueService.store_reply` (linked to the message it answers). A message with no stored
reply is therefore one the user never got an answer to: :meth:`DialogueService.unanswered` finds
them at the next start.

Messages of one user are stored and answered strictly in the order they arrived (see :class:`Turn`),
while other users' messages go on in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from bot import texts
from bot.config import Settings
from bot.db import repository
from bot.db.engine import Sessions, database_unreachable
from bot.db.models import User
from bot.engine import ReplyBackend, SamplingParams
from bot.facts import Fact, extract_facts, facts_exchange
from bot.memory import build_prompt_turns, segments_add_up
from bot.morphology import content_lemmas
from bot.recall import MAX_RECALLED, ranked
from bot.replicas import LeaseLost, current_lease
from dataset_tools.dialogue_format import sanitize_utterance

logger = logging.getLogger(__name__)

TELEGRAM_LIMIT = 4096
T = TypeVar("T")
DB_ATTEMPTS = 4
#: How long a delivered reply keeps trying to be stored while the database is unreachable (a
#: restart, a failover): given up, the message is answered again and the user sees a second
#: reply (or, where the first one's message id was kept, the reply rewritten).
REPLY_STORE_PATIENCE_S = 120.0


def split_message(text: str, limit: int = TELEGRAM_LIMIT) -> list[str]:
    """Cut text into Telegram-sized pieces, preferring paragraph, line, then word boundaries."""
    pieces: list[str] = []
    while len(text) > limit:
        cut = max(text.rfind(sep, 0, limit + 1) for sep in ("\n\n", "\n", " "))
        if cut <= 0:
            cut = limit
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text:
        pieces.append(text)
    return pieces


@dataclass(frozen=True)
class UserRef:
    """Who is talking: the Telegram id (or the console's) and a display name."""

    telegram_id: int
    name: str | None


@dataclass(frozen=True)
class Prompt:
    """The turns a reply is generated from (the persona is the backend's), its sampling
    settings, and how many of the prompt's tokens are memory: the facts exchange and the
    recalled exchanges that made it in."""

    turns: list[str]
    params: SamplingParams
    memory_tokens: int


@dataclass(frozen=True)
class StoredUser:
    """What answering a message needs of its author's row, read once per message (when the
    message is stored, or found owed): the row's id and the user's /temp. Stands in for the
    row in the repository's queries, which only use its id."""

    id: int
    temperature: float | None
    memory_enabled: bool = True

    @classmethod
    def of(cls, row: User) -> StoredUser:
        return cls(row.id, row.temperature, row.memory_enabled)


class Lesson(NamedTuple):
    """What a user's message teaches memory: the (kind, value) facts it states, and the
    words it is indexed under for recall."""

    facts: list[tuple[str, str]]
    terms: set[str]


async def fenced(session: AsyncSession) -> None:
    """With replicas, in a transaction that stores something of a reply: raise ``LeaseLost``
    unless the lease the work runs under still has the user's newest fencing token (the row
    stays locked to the commit, so no newer grant slips in between; ``bot.replicas``)."""
    held = current_lease()
    if held is None or held.token is None:
        return
    if not await repository.holds_lease_token(session, held.user_id, held.token):
        raise held.lost_to_a_newer_token()


@dataclass(frozen=True)
class OwedMessage:
    """A stored Telegram message with no delivered reply: whose, which (``message_id`` in the
    database, ``telegram_message_id`` in its chat), the forum topic its reply belongs in
    (``None`` outside topics), and the bot's message an attempt that died was streaming the
    reply into (``draft_id``); or, when ``role`` is a marker role (``repository.RESET_ROLE``,
    ``FORGET_ROLE``), a /reset or /forget not carried out yet. ``author``: the user's row as
    read with it, so that answering it reads the user no more."""

    user: UserRef
    message_id: int
    thread_id: int | None
    role: str
    draft_id: int | None
    telegram_message_id: int | None
    author: StoredUser | None = None

    @property
    def is_command(self) -> bool:
        return self.role in repository.MARKER_ROLES

    @property
    def is_from_page(self) -> bool:
        """Typed on the Mini App's page: only that page's request answers it."""
        return self.telegram_message_id is None


class Turn:
    """A user's place in line: messages are stored, then answered, in the order they arrived.

    A turn is taken synchronously when a message arrives (before the handler's first await), so
    the order of turns is the order in which aiogram started the update tasks, which is the order
    of the updates. Storing waits only for the previous message to be *stored* (so ids follow
    arrival order and a crash loses nothing queued); answering waits for it to be *answered*.
    """

    def __init__(self, previous: Turn | None) -> None:
        loop = asyncio.get_running_loop()
        self.previous = previous
        self.stored: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()

    async def wait_to_store(self) -> None:
        if self.previous is not None:
            await asyncio.shield(self.previous.stored)

    def mark_stored(self) -> None:
        if not self.stored.done():
            self.stored.set_result(None)

    async def wait_to_answer(self) -> None:
        if self.previous is not None:
            await asyncio.shield(self.previous.done)
            self.previous = None  # let the finished chain be collected

    def finish(self) -> None:
        """This turn is over; it counts as done once every earlier turn is done too.

        Why not at once: a turn that ends early (a re-delivered update, a sticker) would let
        the next message be answered while an earlier one still is, and the replies would
        overtake each other (seen under load in the webhook test)."""
        self.mark_stored()
        previous = self.previous
        if previous is not None and not previous.done.done():
            previous.done.add_done_callback(lambda _: self._set_done())
        else:
            self._set_done()

    def _set_done(self) -> None:
        self.previous = None
        if not self.done.done():
            self.done.set_result(None)


class _TurnQueues:
    """The last turn of each user; an entry goes away when its turn finishes."""

    def __init__(self) -> None:
        self._tails: dict[int, Turn] = {}

    def take(self, user_id: int) -> Turn:
        turn = Turn(self._tails.get(user_id))
        self._tails[user_id] = turn
        turn.done.add_done_callback(lambda _: self._release(user_id, turn))
        return turn

    def _release(self, user_id: int, turn: Turn) -> None:
        if self._tails.get(user_id) is turn:
            del self._tails[user_id]


TOKEN_COUNTS_KEPT = 20_000  # texts whose token count is remembered (a few MB)
# How long a user's message count (recall weighs words by it) is reused before it is counted
# again: a few more messages barely move a word's weight, and counting scans the user's rows.
INDEXED_COUNT_TTL_S = 300.0
INDEXED_COUNT_REUSED_FROM = 1_000


class DialogueService:
    """Memory + prompt + engine, shared by the Telegram handlers and the console chat."""

    def __init__(self, sessions: Sessions, backend: ReplyBackend, settings: Settings) -> None:
        self.sessions = sessions
        self.backend = backend
        self.settings = settings
        self._turns = _TurnQueues()
        self._token_counts: dict[str, int] = {}
        self._counted_by: ReplyBackend | None = None
        self._segments_add_up = False  # see bot.memory.segments_add_up; set with _counted_by
        # each user's indexed message count for recall's word weights, and when it was read
        self._indexed_counts: dict[int, tuple[float, int]] = {}
        # message id -> the exchanges recalled for it, until its reply is stored with them
        self._recalled_for: dict[int, list[int]] = {}

    def take_turn(self, user: UserRef) -> Turn:
        """Call before any await in a handler: it fixes this message's place in line."""
        return self._turns.take(user.telegram_id)

    @contextlib.asynccontextmanager
    async def exclusive(self, user: UserRef) -> AsyncIterator[None]:
        """Run after this user's earlier messages are answered (for /reset, /forget in one
        process; replicas store those in line instead, see :meth:`remember_command`)."""
        turn = self.take_turn(user)
        try:
            await turn.wait_to_answer()
            yield
        finally:
            turn.finish()

    async def store_user_message(
        self,
        user: UserRef,
        text: str,
        telegram_message_id: int | None = None,
        telegram_thread_id: int | None = None,
    ) -> OwedMessage | None:
        """:meth:`remember_user_message`, returning the message as owed (its author's row
        with it, so answering it reads the user no more); ``None`` for an update delivered
        again."""
        stored = await self._store_incoming(
            user,
            repository.USER_ROLE,
            text[: self.settings.max_message_chars],
            telegram_message_id,
            telegram_thread_id,
        )
        if stored is None:
            return None
        message_id, author = stored
        return OwedMessage(
            user,
            message_id,
            telegram_thread_id,
            repository.USER_ROLE,
            None,
            telegram_message_id,
            author,
        )

    async def remember_user_message(
        self,
        user: UserRef,
        text: str,
        telegram_message_id: int | None = None,
        telegram_thread_id: int | None = None,
    ) -> int | None:
        """Store the message before anything else, so a crash mid-reply loses no input.

        Called as soon as the message arrives, before waiting for this user's earlier messages
        to be answered; returns the message id that :meth:`make_reply` answers up to, or
        ``None`` when this Telegram message is already stored (Telegram delivered its update
        again): it has been or will be answered once, and must not be answered twice. A message
        longer than MAX_MESSAGE_CHARS keeps its beginning. The forum topic is kept with it:
        whoever answers it later (a restart, another replica) answers there.
        """
        stored = await self.store_user_message(user, text, telegram_message_id, telegram_thread_id)
        return None if stored is None else stored.message_id

    async def edit_user_message(self, user: UserRef, telegram_message_id: int, text: str) -> bool:
        """The user edited a message in Telegram: memory takes the corrected text, so the
        next replies see what the chat shows (a fixed typo, a changed name). No new reply: the
        one already sent stays; a reply still to come is written from the corrected text.
        False when the message was never stored. Cut to MAX_MESSAGE_CHARS like a new one."""
        text = text[: self.settings.max_message_chars]
        async with self.sessions.begin() as session:
            message_id = await repository.edit_user_message(
                session, user.telegram_id, telegram_message_id, text
            )
            if message_id is None:
                return False
            row = await repository.get_or_create_user(session, user.telegram_id, user.name)
            await repository.forget_message_memory(session, row, message_id)
            await self._learn_from(session, user, row, message_id, text)
        return True

    async def remember_command(
        self,
        user: UserRef,
        role: str,
        telegram_message_id: int,
        telegram_thread_id: int | None = None,
    ) -> int | None:
        """Store /reset or /forget (``repository.RESET_ROLE``/``FORGET_ROLE``) in line with the
        user's messages, to be carried out by :meth:`carry_out` once the messages before it are
        answered. With replicas this is all a webhook request does for them (receiving is
        storing, bot.replicas); ``None`` for a command Telegram delivered again."""
        assert role in repository.MARKER_ROLES, role
        stored = await self._store_incoming(
            user, role, "/" + role, telegram_message_id, telegram_thread_id
        )
        return None if stored is None else stored[0]

    async def _store_incoming(
        self,
        user: UserRef,
        role: str,
        text: str,
        telegram_message_id: int | None,
        telegram_thread_id: int | None,
    ) -> tuple[int, StoredUser] | None:
        """One committed row for something the user sent (retried: :meth:`_write`), with its
        author's row as read for it; ``None`` when Telegram delivered it again."""
        tries = 0
        # What the message teaches memory is worked out before the transaction (pure CPU), so
        # the database is held only for the writes, and a retried write does not redo it.
        lesson = self._lesson(user, text) if role == repository.USER_ROLE else None

        async def add(session: AsyncSession) -> repository.AddedMessage | None:
            return await repository.add_message_from(
                session,
                user.telegram_id,
                role,
                text,
                telegram_message_id=telegram_message_id,
                telegram_thread_id=telegram_thread_id,
                terms=lesson.terms if lesson else (),
            )

        async def store(session: AsyncSession) -> tuple[int, StoredUser]:
            nonlocal tries
            tries += 1
            added = await add(session)
            if added is None:  # their first message: no row yet
                await repository.get_or_create_user(session, user.telegram_id, user.name)
                added = await add(session)
                assert added is not None
            author = StoredUser(added.user_id, added.temperature, added.memory_enabled)
            if user.name and added.name != user.name:
                await repository.rename_user(session, author, user.name)
            if lesson is not None and lesson.facts and author.memory_enabled:
                await repository.remember_facts(session, author, lesson.facts, added.id)
            return added.id, author

        # Without facts, each statement of the store stands alone: the message with its index
        # words is one (on PostgreSQL), and creating or renaming the author needs no more than
        # to have happened before or after it. Facts are kept with the message, all or nothing;
        # and a message with no Telegram id (from the page) in a transaction, as a retry after a
        # stored message's rename failed would store it again (a Telegram id's would not pass
        # the unique constraint: answered above as stored).
        alone = (lesson is None or not lesson.facts) and telegram_message_id is not None
        try:
            return await self._write(store, single_statements=alone)
        except IntegrityError:
            if telegram_message_id is None:
                raise
            stored = await self._stored_id(user, telegram_message_id)
            if stored is None:
                raise
            if tries > 1:
                # An earlier try's commit reached the database and only its answer was lost:
                # this message is the one stored, not Telegram delivering it again.
                logger.info("message stored by a try whose answer was lost; answering it")
                return stored
            logger.info("update delivered again: message already stored, not answered twice")
            return None

    @staticmethod
    def _lesson(user: UserRef, text: str) -> Lesson | None:
        """What a user's message teaches memory: the facts it states and its index words.
        Only from a person's own chat (group chat ids are negative: in a group the memory is
        the group's, and "меня зовут Аня" is one member's); ``None`` for a group."""
        if user.telegram_id < 0:
            return None
        return Lesson([(f.kind, f.value) for f in extract_facts(text)], content_lemmas(text))

    async def _learn_from(
        self, session: AsyncSession, user: UserRef, row: User, message_id: int, text: str
    ) -> None:
        """Keep what :meth:`_lesson` finds in message ``message_id``, while memory is on (a
        new message's store does the same in fewer statements)."""
        lesson = self._lesson(user, text)
        if lesson is None or not row.memory_enabled:
            return
        facts, terms = lesson
        if facts:
            await repository.remember_facts(session, row, facts, message_id)
        await repository.index_terms(session, row, message_id, terms)

    async def _write(
        self,
        work: Callable[[AsyncSession], Awaitable[T]],
        patience_s: float = 0.0,
        single_statements: bool = False,
    ) -> T:
        """``work`` in one committed transaction, tried again while the database is locked,
        unreachable or silent (each try waits at most DATABASE_TIMEOUT_S: SQLite's busy
        timeout, PostgreSQL's command timeout, then a fresh connection): what a user sent, and
        the reply they were sent, are not lost to a database that comes back within seconds.
        ``patience_s``: go on trying (every 5 s at most) until that long has passed.
        ``single_statements``: each of ``work``'s statements stands alone and may commit by
        itself (:meth:`Sessions.single_statements`)."""
        gives_up_at = time.monotonic() + patience_s
        attempt = 0
        while True:
            attempt += 1
            opened = self.sessions.single_statements if single_statements else self.sessions.begin
            try:
                async with opened() as session:
                    return await work(session)
            except Exception as error:
                if not database_unreachable(error) or (
                    attempt >= DB_ATTEMPTS and time.monotonic() >= gives_up_at
                ):
                    raise
                logger.warning("database unavailable, retry %d", attempt)
                await asyncio.sleep(min(0.5 * 2**attempt, 5.0))

    async def carry_out(
        self, user: UserRef, marker_id: int, role: str, thread_id: int | None = None
    ) -> int:
        """Do what a stored /reset or /forget asked (``marker_id``, see
        :meth:`remember_command`, sent in forum topic ``thread_id``): delete everything before
        it (/reset: in that topic). Call it when the messages before it are answered (with
        replicas, under the user's lease)."""
        async with self.sessions.begin() as session:
            await fenced(session)
            row = await repository.get_or_create_user(session, user.telegram_id, user.name)
            everything = role == repository.FORGET_ROLE
            topics = await repository.topics(session, user.telegram_id) if everything else []
            deleted = await repository.carry_out_marker(session, row, marker_id, role)
        if everything:
            self._forget_cached(user.telegram_id, topics)
        else:
            self.backend.forget(dialogue_key(user.telegram_id, thread_id))
        return deleted

    def _forget_cached(self, telegram_id: int, topics: list[int]) -> None:
        """Drop the keys/values the engine keeps for this chat's dialogues: its own and one per
        forum topic (``make_reply``'s keys)."""
        self.backend.forget(telegram_id)
        for topic in topics:
            self.backend.forget(dialogue_key(telegram_id, topic))

    async def _stored_id(
        self, user: UserRef, telegram_message_id: int
    ) -> tuple[int, StoredUser] | None:
        async with self.sessions() as session:
            row = await repository.get_or_create_user(session, user.telegram_id, user.name)
            stored = await repository.stored_message_id(session, row, telegram_message_id)
            return None if stored is None else (stored, StoredUser.of(row))

    async def unanswered(
        self,
        max_age_s: float,
        telegram_id: int | None = None,
        min_age_s: float = 0.0,
        *,
        since: datetime | None = None,
        from_id: int | None = None,
        pages_younger_than_s: float | None = None,
    ) -> list[OwedMessage]:
        """Each Telegram message younger than ``max_age_s`` (counted from ``since``, default
        now), or with an id of at least ``from_id``, and older than ``min_age_s``, with no
        delivered reply (the bot died mid-reply, or Telegram refused the reply), and each
        /reset or /forget not carried out yet, oldest first; only ``telegram_id``'s when it
        is given. ``pages_younger_than_s``: with them, the messages typed on the page that
        long ago or less still waiting for their answer (:attr:`OwedMessage.is_from_page`)."""
        now = datetime.now(UTC)
        pages_since = (
            None if pages_younger_than_s is None else now - timedelta(seconds=pages_younger_than_s)
        )
        async with self.sessions() as session:
            pending = await repository.unanswered_messages(
                session,
                (since or now) - timedelta(seconds=max_age_s),
                until=now - timedelta(seconds=min_age_s) if min_age_s > 0 else None,
                telegram_id=telegram_id,
                from_id=from_id,
                pages_since=pages_since,
            )
        return [
            OwedMessage(
                UserRef(p.telegram_id, p.name),
                p.message_id,
                p.thread_id,
                p.role,
                p.draft_id,
                p.telegram_message_id,
                StoredUser(p.user_id, p.temperature, p.memory_enabled),
            )
            for p in pending
        ]

    async def make_reply(
        self,
        user: UserRef,
        message_id: int | None = None,
        on_text: Callable[[str], None] | None = None,
        thread_id: int | None = None,
        author: StoredUser | None = None,
    ) -> str:
        """Generate the reply to the history up to ``message_id`` (may raise EngineBusy/Timeout).

        Bounding the history by the message id means a reply answers exactly the messages sent
        before it, even when the user has already written more while waiting. ``on_text`` gets
        the reply so far while it is generated (for streaming). ``thread_id``: the forum topic
        the message was written in; the reply sees that topic's conversation only. ``author``:
        the user's row as read when the message was stored (read here when not given).
        """
        prompt = await self.prompt_for(user, message_id, thread_id, author)
        key = dialogue_key(user.telegram_id, thread_id)
        reply = await self.backend.generate(prompt.turns, prompt.params, key=key, on_text=on_text)
        return reply or texts.FALLBACK_REPLY

    async def prompt_for(
        self,
        user: UserRef,
        message_id: int | None = None,
        thread_id: int | None = None,
        author: StoredUser | None = None,
    ) -> Prompt:
        """What :meth:`make_reply` gives the model: the turns (persona aside) and the sampling
        settings; also what ``python -m bot.memory_eval`` measures."""
        async with self.sessions() as session:
            if author is None:
                row = await repository.get_or_create_user(session, user.telegram_id, user.name)
                author = StoredUser.of(row)
            history = await repository.recent_turns(
                session,
                author,
                self.settings.history_messages,
                up_to_id=message_id,
                thread_id=thread_id,
            )
            facts = await repository.user_facts(session, author) if author.memory_enabled else []
            exchange = list(facts_exchange([Fact(f.kind, f.value) for f in facts]) or ())
            current = history[-1] if history and history[-1].role == repository.USER_ROLE else None
            if author.memory_enabled:
                history = await self._with_recalled(session, author, history)
            window = self._fit(history, exchange)
            recalled_ids: list[int] = []
            recalled: list[str] = []
            if author.memory_enabled and current is not None:
                recalled_ids, recalled = await self._recall(session, author, current, window)
        turns = self._fit(history, exchange, recalled) if recalled else window
        placed = bool(recalled) and turns[-1 - len(recalled) : -1] == recalled
        if placed and current is not None and current.place:
            # Kept with the message once its reply is stored, in the reply's own commit (a
            # commit of its own here cost every recalling message a few ms before its reply):
            # the next prompts hold it there again (migration 0010). A reply cut by a crash is
            # answered with what its new prompt recalls.
            if len(self._recalled_for) >= TOKEN_COUNTS_KEPT:  # replies never stored
                self._recalled_for.clear()
            self._recalled_for[current.place] = recalled_ids
        memory = (exchange if turns[: len(exchange)] == exchange else []) + (
            recalled if placed else []
        )
        params = SamplingParams(
            temperature=author.temperature or self.settings.temperature,
            top_p=self.settings.top_p,
            top_k=self.settings.top_k,
            repetition_penalty=self.settings.repetition_penalty,
            max_new_tokens=self.settings.reply_tokens,
            num_beams=self.settings.num_beams,
        )
        return Prompt(turns, params, sum(self._count_tokens(t) for t in memory))

    def _count_tokens(self, text: str) -> int:
        """The backend's token count, remembered: building each prompt counts the window's
        turns again, and the window moves by one exchange a message (measured with
        ``benchmarks.memory_latency``, tokenizing was most of a prompt's cost). Emptied when
        it holds TOKEN_COUNTS_KEPT texts, a bound on its memory."""
        self._know_backend()
        counts = self._token_counts
        count = counts.get(text)
        if count is None:
            if len(counts) >= TOKEN_COUNTS_KEPT:
                counts.clear()
            count = counts[text] = self.backend.count_tokens(text)
        return count

    def _know_backend(self) -> None:
        """What is remembered about the backend's tokenizer is of this backend (tests swap it)."""
        if self._counted_by is not self.backend:
            self._token_counts.clear()
            self._counted_by = self.backend
            self._segments_add_up = segments_add_up(self.backend.count_tokens)

    def _fit(
        self,
        history: list[repository.Turn],
        pinned: list[str],
        recalled: list[str] | None = None,
    ) -> list[str]:
        self._know_backend()
        return build_prompt_turns(
            history,
            self._count_tokens,
            self.backend.prompt_budget,
            self.backend.persona,
            self.settings.history_trim_step,
            pinned=pinned,
            recalled=recalled or (),
            segments_add_up=self._segments_add_up,
        )

    async def _with_recalled(
        self, session: AsyncSession, author: StoredUser, history: list[repository.Turn]
    ) -> list[repository.Turn]:
        """``history`` with the exchanges recalled for each earlier message put back right
        before it, as its prompt had them (so this prompt extends that one, and the engine's
        cached keys/values of it stay good). A message's own are kept with its reply, so the
        message being answered has none yet."""
        wanted = {i for turn in history for i in turn.recalled}
        if not wanted:
            return history
        found = await repository.exchanges(session, author, wanted)
        with_them: list[repository.Turn] = []
        for turn in history:
            for message_id in turn.recalled:
                asked, answered = found.get(message_id, ("", None))
                if asked and answered:  # still stored (not pruned, not forgotten)
                    with_them += [
                        repository.Turn(repository.USER_ROLE, asked),
                        repository.Turn(repository.BOT_ROLE, answered),
                    ]
            with_them.append(turn)
        return with_them

    async def _recall(
        self,
        session: AsyncSession,
        author: StoredUser,
        message: repository.Turn,
        window: list[str],
    ) -> tuple[list[int], list[str]]:
        """The user's old exchanges ``message`` is about that ``window`` (the prompt's turns
        without them) does not hold, as their messages' ids and as alternating turns within
        MEMORY_TOKENS, in the order they were said."""
        budget = self.settings.memory_tokens
        if budget <= 0 or message.place is None:
            return [], []
        words = content_lemmas(message.text)
        if not words:
            return [], []
        hits = await repository.term_hits(
            session,
            author,
            words,
            before_id=message.place,
            indexed=await self._indexed(session, author),
        )
        best = ranked(words, hits)
        found = await repository.exchanges(session, author, [m for m, _ in best])
        shown = "\n".join(window)
        chosen: list[int] = []
        spent = 0
        for message_id, _ in best:  # the most relevant first, while the budget lasts
            asked, answered = found.get(message_id, ("", None))
            if not asked or not answered or asked in shown:
                continue  # never answered (not an exchange), or in the window already
            cost = self._count_tokens(asked) + self._count_tokens(answered) + 4
            if spent + cost <= budget:
                chosen.append(message_id)
                spent += cost
            if len(chosen) == MAX_RECALLED:
                break
        turns: list[str] = []
        for message_id in sorted(chosen):
            asked, answered = found[message_id]
            turns += [asked, answered or ""]
        return sorted(chosen), turns

    async def _indexed(self, session: AsyncSession, author: StoredUser) -> int:
        """The user's indexed message count (``repository.indexed_messages``), reused for
        INDEXED_COUNT_TTL_S once it is large: then counting is the slow part, and a few more
        messages barely move a word's weight; a short history is counted every time (there
        each message does move it, and counting is cheap)."""
        known = self._indexed_counts.get(author.id)
        if known is not None and time.monotonic() - known[0] <= INDEXED_COUNT_TTL_S:
            return known[1]
        count = await repository.indexed_messages(session, author)
        if count >= INDEXED_COUNT_REUSED_FROM:
            if len(self._indexed_counts) >= TOKEN_COUNTS_KEPT:  # bounded like token counts
                self._indexed_counts.clear()
            self._indexed_counts[author.id] = (time.monotonic(), count)
        return count

    async def store_reply(
        self,
        user: UserRef,
        reply: str,
        reply_to_id: int | None,
        author: StoredUser | None = None,
    ) -> bool:
        """Keep the reply once the user has it: ``reply_to_id`` marks that message answered.

        False, and nothing stored, when that message has a reply already: with replicas, one
        that stalled past its lease just after checking it gets here after another replica
        answered the message (the database keeps one reply per message, migration 0007).
        """

        recalled = self._recalled_for.pop(reply_to_id, None) if reply_to_id else None

        async def store(session: AsyncSession) -> None:
            await fenced(session)
            row = author or await repository.get_or_create_user(
                session, user.telegram_id, user.name
            )
            await repository.add_message(
                session, row, repository.BOT_ROLE, reply, reply_to_id=reply_to_id
            )
            if recalled and reply_to_id:  # in the same commit as the reply (prompt_for says why)
                await repository.set_recalled(session, reply_to_id, recalled)

        try:  # retried: a commit that reached the server before the error is refused, not doubled
            # The user has this reply: waiting out a database restart beats answering again.
            await self._write(store, patience_s=REPLY_STORE_PATIENCE_S)
        except IntegrityError:
            if reply_to_id is None or not await self._has_reply(reply_to_id):
                raise
            return False
        return True

    async def _has_reply(self, message_id: int) -> bool:
        async with self.sessions() as session:
            return await repository.has_reply(session, message_id)

    async def wrote_after(self, message_id: int) -> bool:
        """Whether the user (or group) has written since message ``message_id``."""
        async with self.sessions() as session:
            return await repository.wrote_after(session, message_id)

    async def settle(self, message_id: int) -> None:
        """Give up answering message ``message_id``: the user got a notice instead, or the
        chat refuses the bot. No restart or sweep answers it again."""
        async with self.sessions.begin() as session:
            await fenced(session)
            await repository.settle(session, message_id, datetime.now(UTC))

    async def remember_draft(self, message_id: int, telegram_message_id: int) -> None:
        """The Telegram message the reply to ``message_id`` is being streamed into, kept with
        the message so that whoever answers it after a crash writes into it."""
        try:
            async with self.sessions.begin() as session:
                await fenced(session)
                await repository.set_reply_draft(session, message_id, telegram_message_id)
        except LeaseLost:
            # The lease changed hands while the message was on its way, and it is in the
            # user's chat now: noted where nobody has noted one (the holder then writes its
            # reply into it, instead of leaving it beside its own), never over the holder's.
            async with self.sessions.begin() as session:
                await repository.keep_sent_draft(session, message_id, telegram_message_id)
            raise

    async def reply_draft(self, message_id: int) -> int | None:
        """The bot's message noted for the reply to ``message_id`` (see :meth:`remember_draft`)."""
        async with self.sessions() as session:
            return await repository.reply_draft(session, message_id)

    # -- fencing tokens of replicas' leases (bot.replicas.LeaseFence) --------------------------

    async def grant_lease_token(self, user_id: int) -> int:
        return await self._write(lambda session: repository.grant_lease_token(session, user_id))

    async def holds_lease_token(self, user_id: int, token: int) -> bool:
        return await self._write(
            lambda session: repository.holds_lease_token(session, user_id, token)
        )

    async def reset(self, user: UserRef, thread_id: int | None = None) -> int:
        """Forget the conversation (``/reset``); in a forum group, that of topic ``thread_id``."""
        async with self.sessions.begin() as session:
            row = await repository.get_or_create_user(session, user.telegram_id, user.name)
            cleared = await repository.clear_history(session, row, thread_id)
        self.backend.forget(dialogue_key(user.telegram_id, thread_id))
        return cleared

    async def forget(self, user: UserRef) -> bool:
        """Delete everything stored about the user (``/forget``)."""
        async with self.sessions.begin() as session:
            topics = await repository.topics(session, user.telegram_id)
            deleted = await repository.delete_user(session, user.telegram_id)
        self._forget_cached(user.telegram_id, topics)
        return deleted

    async def move_chat(self, from_telegram_id: int, to_telegram_id: int) -> bool:
        """A group became a supergroup under a new id: its memory goes with it."""
        async with self.sessions.begin() as session:
            topics = await repository.topics(session, from_telegram_id)
            moved = await repository.move_chat(session, from_telegram_id, to_telegram_id)
        self._forget_cached(from_telegram_id, topics)  # under the old id: never asked for again
        return moved

    async def prune(self, older_than_days: float) -> int:
        """Delete messages older than the retention period."""
        before = datetime.now(UTC) - timedelta(days=older_than_days)
        async with self.sessions.begin() as session:
            return await repository.prune_messages(session, before)

    async def stats_text(self, started: float) -> str:
        async with self.sessions() as session:
            users, messages = await repository.totals(session)
        uptime = max(time.monotonic() - started, 1e-9)
        return texts.STATS.format(
            users=users,
            messages=messages,
            queue=self.backend.queue_depth,
            uptime=timedelta(seconds=int(uptime)),
            replies=self.backend.replies,
            replies_per_s=self.backend.replies / uptime,
            tokens=self.backend.tokens,
            tokens_per_s=self.backend.tokens / uptime,
        )

    async def conversation(
        self, user: UserRef, before_id: int | None, limit: int
    ) -> list[repository.ShownMessage]:
        """The Mini App's view of the conversation: ``limit`` messages older than
        ``before_id``, newest first."""
        async with self.sessions() as session:
            return await repository.conversation_page(session, user.telegram_id, before_id, limit)

    async def page_regenerable(self, user: UserRef) -> bool:
        """Whether the page's Regenerate has something to answer anew (see below)."""
        async with self.sessions() as session:
            message_id, _ = await repository.last_page_exchange(session, user.telegram_id)
        return bool(message_id)

    async def reopen_last_page_message(self, user: UserRef) -> int | None:
        """Regenerate: the newest message, when the user typed it in the Mini App, is owed its
        reply again (the reply it had is deleted); its id, or ``None`` when the newest exchange
        was had in Telegram (that reply is on the user's screen there and stays)."""
        async with self.sessions.begin() as session:
            message_id, reply_id = await repository.last_page_exchange(session, user.telegram_id)
            if not message_id:
                return None
            if reply_id is not None:
                await repository.delete_reply(session, reply_id)
        return message_id

    async def memory(self, user: UserRef) -> tuple[bool, list[tuple[int, str, str]]]:
        """What ``/memory`` shows: whether memory is on, and each fact as (id, kind, value)."""
        async with self.sessions() as session:
            row = await repository.get_or_create_user(session, user.telegram_id, user.name)
            facts = await repository.user_facts(session, row)
            return row.memory_enabled, [(f.id, f.kind, f.value) for f in facts]

    async def forget_fact(self, user: UserRef, fact_id: int) -> bool:
        """Delete one of ``user``'s facts (a /memory button); False when it is not theirs or
        already gone."""
        async with self.sessions.begin() as session:
            return await repository.forget_fact(session, user.telegram_id, fact_id)

    async def set_memory(self, user: UserRef, enabled: bool) -> None:
        """/memory on|off: with it off the facts stay stored (and listed) but no prompt has
        them, and no new ones are kept."""
        async with self.sessions.begin() as session:
            row = await repository.get_or_create_user(session, user.telegram_id, user.name)
            await repository.set_memory_enabled(session, row, enabled)

    async def get_temperature(self, user: UserRef) -> float:
        async with self.sessions() as session:
            row = await repository.get_or_create_user(session, user.telegram_id, user.name)
            return row.temperature or self.settings.temperature

    async def set_temperature(self, user: UserRef, value: float) -> None:
        async with self.sessions.begin() as session:
            row = await repository.get_or_create_user(session, user.telegram_id, user.name)
            await repository.set_temperature(session, row, value)

    async def temperature_command(self, user: UserRef, argument: str | None) -> str:
        """The answer to ``/temp [value]``: show, set, or explain why not (nothing changes)."""
        low, high = self.settings.temperature_min, self.settings.temperature_max
        if not argument or not argument.strip():
            value = await self.get_temperature(user)
            return texts.TEMP_SHOW.format(value=value, low=low, high=high)
        try:
            value = parse_temperature(argument, low, high)
        except TemperatureError as error:
            return str(error)
        await self.set_temperature(user, value)
        return texts.TEMP_SET.format(value=value)


def dialogue_key(telegram_id: int, thread_id: int | None) -> Hashable:
    """The engine's cache key of a chat's dialogue: one per forum topic (a topic's prompt is no
    prefix of another's), the chat id alone outside topics."""
    return telegram_id if thread_id is None else (telegram_id, thread_id)


def clean_user_text(text: str) -> str:
    """What of a user's text reaches memory: no control characters, no speaker tags."""
    return sanitize_utterance(text)


class TemperatureError(ValueError):
    """A /temp argument that cannot be used; the message is the Russian reply."""


def parse_temperature(raw: str, low: float, high: float) -> float:
    """``"0.7"`` or ``"0,7"`` → 0.7 within [low, high]; anything else → TemperatureError."""
    cleaned = raw.strip().replace(",", ".")
    try:
        value = float(cleaned)
    except ValueError:
        raise TemperatureError(texts.TEMP_NOT_NUMBER.format(raw=raw.strip()[:50])) from None
    if value != value or not low <= value <= high:  # NaN, inf and out of range
        raise TemperatureError(
            texts.TEMP_OUT_OF_RANGE.format(low=low, high=high, value=raw.strip()[:50])
        )
    return round(value, 3)
