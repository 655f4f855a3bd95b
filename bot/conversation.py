"""A message's life, in one place: store → wait its turn → lease → generate → stream → store.

The Telegram adapters (``bot/handlers``) translate an update into one call here
(:meth:`Conversations.receive_text`, :meth:`Conversations.receive_command`) and are never
called back. Everything after that happens below this line, and the two other ways a message
gets answered enter at the same point, :meth:`Conversations._answer_owed`:

- **at start** (one process): each recent message the last run left unanswered (``kill -9``
  mid-reply, Telegram refusing the reply for longer than the retries) takes its user's turn
  before the first update is handled, and is answered like a new one
  (:meth:`Conversations.answer_unanswered`);
- **the sweep** (replicas, ``REDIS_URL``): there is no "start" to wait for, so every replica
  keeps looking for owed messages whose user's lease is free (:meth:`Conversations.sweep_once`).

A user's message is stored before its reply is generated, and the reply is stored only after
Telegram took it, so a message with no stored reply is one the user never got an answer to.
Older ones than ``PENDING_REPLY_MAX_AGE_S`` stay in the history unanswered (a reply hours late
would confuse more than help). With replicas, answering happens under the user's lease
(:mod:`bot.replicas`): receiving is storing, and whoever holds the lease answers everything owed,
oldest first.

The user's row is read once per message: when it is stored (or, for a message owed from before,
when it is found), and what the rest of its life needs of it travels with it
(:class:`bot.dialogue.OwedMessage`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from aiogram import Bot
from aiogram.exceptions import TelegramForbiddenError
from aiogram.types import Message

from bot import texts
from bot.chats import may_change_shared_memory, topic_of, user_ref
from bot.config import Settings
from bot.db import repository
from bot.dialogue import DialogueService, OwedMessage, Turn, UserRef
from bot.engine import EngineBusy, EngineTimeout
from bot.metrics import BotMetrics
from bot.replicas import LeaseLost, ReplicaCoordinator, check_lease
from bot.streaming import Drafts, ReplyStream, TypingIndicator

logger = logging.getLogger(__name__)

T = TypeVar("T")

SHUTDOWN_GRACE_S = 10.0


def held_too_long(sent: datetime, online_since: datetime, max_age_s: float) -> bool:
    """Whether Telegram held a message sent at ``sent`` while the bot was down, for longer than
    PENDING_REPLY_MAX_AGE_S: sent before this process started and older than that now.

    Telegram keeps a stopped bot's updates for a day and hands them all over at the next start.
    Answered like new ones they flood the queue with replies hours late (new users meanwhile
    told the bot is busy) and, in groups, bury the conversation under answers to what nobody
    remembers asking. They get what a message left unanswered by a crash gets: answered while
    recent, otherwise kept in the history unanswered. A message sent since the start is live,
    however long it waits. Telegram's dates are whole seconds, so the start is compared in
    whole seconds too.
    """
    if sent >= online_since.replace(microsecond=0):
        return False
    return (datetime.now(sent.tzinfo) - sent).total_seconds() > max_age_s


@dataclass(frozen=True)
class PageReply:
    """What the Mini App gets for a message: the reply (or the notice given instead: busy,
    too slow) and whether it was stored as the message's reply."""

    message_id: int
    text: str
    stored: bool


def done_text(role: str, thread_id: int | None) -> str:
    """What the user is told once /reset (``role``) or /forget is carried out: in a forum
    topic, /reset forgets that topic's conversation only, and says so."""
    if role == repository.FORGET_ROLE:
        return texts.FORGET_DONE
    return texts.RESET_DONE if thread_id is None else texts.RESET_TOPIC_DONE


class Conversations:
    """Owns each message's life from the moment it is received to its stored reply.

    ``replicas`` (REDIS_URL): answers are given under each user's lease, after the update is
    acknowledged, by whichever replica holds it; without, this process answers in line.
    ``online_since``: when this process started (a message Telegram held from before it is
    answered only while recent, :func:`held_too_long`).
    """

    def __init__(
        self,
        dialogue: DialogueService,
        metrics: BotMetrics,
        settings: Settings,
        replicas: ReplicaCoordinator | None = None,
        online_since: datetime | None = None,
    ) -> None:
        self.dialogue, self.metrics, self.settings = dialogue, metrics, settings
        self.replicas = replicas
        self.online_since = online_since or datetime.now(UTC)
        self._tasks: set[asyncio.Task[None]] = set()  # answers running in the background
        self._swept: set[int] = set()  # users this replica's sweep is answering now
        self.drafts = Drafts(settings.stream_drafts)  # off for good at the first refusal

    # -- entry points of the Telegram adapters --------------------------------------------------

    async def receive_text(self, bot: Bot, message: Message, text: str) -> None:
        """A user's text (``text``: what of it goes into memory): store it, then answer it in
        its turn, here or (replicas) under the user's lease after the update is acknowledged.

        Call without awaiting anything before it in the handler: the turn is taken first
        thing, which fixes this message's place among the user's messages."""
        user = user_ref(message)
        turn = self.dialogue.take_turn(user)  # first, before any await
        try:
            thread_id = topic_of(message)
            await turn.wait_to_store()
            stored = await self.dialogue.store_user_message(
                user, text, message.message_id, thread_id
            )
            turn.mark_stored()
            if stored is None:  # the same update again: answered once already, or pending
                return
            if held_too_long(
                message.date, self.online_since, self.settings.pending_reply_max_age_s
            ):
                await self.dialogue.settle(stored.message_id)
                logger.info(
                    "chat %s: message %d was sent %s, while the bot was down: kept in the "
                    "history, not answered (older than PENDING_REPLY_MAX_AGE_S)",
                    user.telegram_id,
                    message.message_id,
                    message.date.isoformat(timespec="seconds"),
                )
                return
            if self.replicas is not None:
                self.answer_soon(bot, user, from_id=stored.message_id)
                return
            await self._answer(bot, turn, stored)
        finally:
            turn.finish()

    async def receive_command(self, bot: Bot, message: Message, role: str) -> None:
        """/reset or /forget (``role``): carried out after the replies to the user's earlier
        messages, if the sender may change this chat's memory (asked only once the command has
        its place in line: asking Telegram takes a moment, and a message sent after the
        command must stay after it). With replicas it is stored in line with the messages and
        carried out by the lease's holder; the webhook request never waits for a lease."""
        user, thread_id = user_ref(message), topic_of(message)
        turn = self.dialogue.take_turn(user)  # before any await, like a message
        try:
            if self.replicas is None:
                await turn.wait_to_answer()
            else:
                await turn.wait_to_store()
            if not await may_change_shared_memory(message, bot, self.settings):
                await message.answer(texts.GROUP_ADMINS_ONLY)
                return
            if self.replicas is None:
                if role == repository.FORGET_ROLE:
                    await self.dialogue.forget(user)
                else:
                    await self.dialogue.reset(user, thread_id)
                await message.answer(done_text(role, thread_id))
                return
            stored = await self.dialogue.remember_command(user, role, message.message_id, thread_id)
            turn.mark_stored()
            if stored is not None:
                self.answer_soon(bot, user, from_id=stored)
        finally:
            turn.finish()

    # -- the Mini App's page (bot.webapp) -------------------------------------------------------

    async def receive_from_page(
        self, bot: Bot, user: UserRef, text: str, on_text: Callable[[str], None]
    ) -> PageReply:
        """A message typed in the Mini App: stored in the user's line exactly as a Telegram
        message (the same turn order; with replicas, under the same lease, in its place among
        the owed messages), answered on the page (``on_text`` gets the reply as it grows),
        stored with its reply. It carries no Telegram message id, so no restart or sweep ever
        answers it in the Telegram chat; one the page gave up on is settled, so nothing waits
        for it."""
        turn = self.dialogue.take_turn(user)  # first, before any await
        try:
            await turn.wait_to_store()
            stored = await self.dialogue.store_user_message(user, text)
            turn.mark_stored()
            assert stored is not None  # only a Telegram id can be delivered twice
            if self.replicas is None:
                await turn.wait_to_answer()
                return await self._page_reply(user, stored.message_id, on_text)
        finally:
            # With replicas the turn ends once stored, as a Telegram message's does: the answer
            # comes under the lease, in a turn of its own after what is owed before it (held
            # on, this turn made those answers wait for it while it waited for them).
            turn.finish()
        message_id = stored.message_id
        try:
            reply = await self._under_lease(
                bot, user, lambda: self._page_reply(user, message_id, on_text), before_id=message_id
            )
            if not reply.stored:
                await self.dialogue.settle(message_id)
            return reply
        finally:
            # The Telegram messages stored after this one waited for it (a drain stops at it).
            self.answer_soon(bot, user, from_id=message_id)

    async def regenerate_on_page(
        self, bot: Bot, user: UserRef, on_text: Callable[[str], None]
    ) -> PageReply | None:
        """The page's Regenerate: the newest message, typed on the page, is answered anew (its
        old reply deleted first); ``None`` when the newest exchange was had in Telegram."""

        async def regenerate() -> PageReply | None:
            message_id = await self.dialogue.reopen_last_page_message(user)
            if message_id is None:
                return None
            return await self._page_reply(user, message_id, on_text)

        if self.replicas is not None:
            return await self._under_lease(bot, user, regenerate)
        turn = self.dialogue.take_turn(user)
        try:
            await turn.wait_to_answer()  # after whatever the user sent before
            return await regenerate()
        finally:
            turn.finish()

    async def _under_lease(
        self,
        bot: Bot,
        user: UserRef,
        answer: Callable[[], Awaitable[T]],
        before_id: int | None = None,
    ) -> T | PageReply:
        """Replicas: ``answer`` under the user's lease, after what is owed in Telegram before
        it (before message ``before_id``; everything owed when ``None``) is answered there, in
        this replica's line for the user."""
        assert self.replicas is not None
        async with self.replicas.lease(user.telegram_id, wait=True) as held:
            if held is None:  # another replica kept the user's lease past REPLICA_WAIT
                return PageReply(before_id or 0, texts.BUSY, stored=False)
            await self._answer_all(bot, user, None, before_id=before_id)
            turn = self.dialogue.take_turn(user)
            turn.mark_stored()
            try:
                await turn.wait_to_answer()
                return await answer()
            finally:
                turn.finish()

    async def _page_reply(
        self, user: UserRef, message_id: int, on_text: Callable[[str], None]
    ) -> PageReply:
        """Generate and store the reply to ``message_id`` for the page. Stopped (the request's
        task cancelled: the page's Stop, or the page closed), it keeps what the user saw."""
        shown = ""

        def show(text: str) -> None:
            nonlocal shown
            shown = text
            on_text(text)

        self.metrics.page_generations.inc()
        try:
            reply = await self.dialogue.make_reply(user, message_id, on_text=show)
        except (EngineBusy, EngineTimeout) as refusal:
            self.metrics.busy.inc()
            notice = texts.BUSY if isinstance(refusal, EngineBusy) else texts.TIMEOUT
            return PageReply(message_id, notice, stored=False)
        except asyncio.CancelledError:
            if shown:
                check_lease()
                await asyncio.shield(self.dialogue.store_reply(user, shown, message_id))
            else:  # stopped before a word: owed nothing, and nothing waits for it
                await asyncio.shield(self.dialogue.settle(message_id))
            raise
        finally:
            self.metrics.page_generations.dec()
        check_lease()
        stored = await self.dialogue.store_reply(user, reply, message_id)
        if stored:
            self.metrics.replies.inc()
        return PageReply(message_id, reply, stored=stored)

    # -- the start-up pass and the sweep ---------------------------------------------------------

    async def answer_unanswered(self, bot: Bot) -> list[asyncio.Task[None]]:
        """One process, at start: queue an answer to each unanswered recent message (and carry
        out each stored /reset or /forget replicas left); returns the tasks that answer them.

        The turns are all taken before this returns (call it before updates are handled), so
        the answers keep per-user order ahead of anything that arrives after the start. With
        PENDING_REPLY_MAX_AGE_S=0 no message is answered late, but a /reset is still carried
        out."""
        pending = await self.dialogue.unanswered(self.settings.pending_reply_max_age_s)
        if pending:
            logger.info("answering %d message(s) left unanswered before the start", len(pending))
        tasks = []
        for owed in pending:
            turn = self.dialogue.take_turn(owed.user)
            turn.mark_stored()
            tasks.append(asyncio.create_task(self._answer_in_turn(bot, turn, owed)))
        return tasks

    async def _answer_in_turn(self, bot: Bot, turn: Turn, owed: OwedMessage) -> None:
        """One owed answer at start; whatever happens, the user's next turn may go on."""
        try:
            await self._answer_owed(bot, turn, owed)
        except Exception:  # it stays unanswered in the database: the next start tries again
            self.metrics.errors.inc()
            logger.exception("could not answer a message left from before the start")
        finally:
            turn.finish()

    def answer_soon(
        self, bot: Bot, user: UserRef, wait: bool = True, from_id: int | None = None
    ) -> None:
        """Replicas: answer what ``user`` is owed, in the background, under the user's lease;
        each reply goes to the forum topic stored with its message. ``from_id``: the message
        just stored, answered (with all after it) however long the user's queue takes, and
        whatever PENDING_REPLY_MAX_AGE_S says of late replies. ``wait=False``: leave it if
        another replica holds the lease (it is answering them)."""
        task = asyncio.create_task(self._drain(bot, user, wait, from_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def sweep_forever(self, bot: Bot) -> None:
        """Every REPLICA_SWEEP_INTERVAL_S: answer owed messages nobody is answering (a replica
        died holding them, Redis was briefly down, Telegram refused a reply), and at start what
        the whole deployment left owed."""
        interval = self.settings.replica_sweep_interval_s
        while True:
            try:
                await self.sweep_once(bot, older_than_s=interval)
            except Exception:
                logger.exception("sweep for owed replies failed")
            await asyncio.sleep(interval)

    async def sweep_once(self, bot: Bot, older_than_s: float = 0.0) -> None:
        owed = await self.dialogue.unanswered(
            self.settings.pending_reply_max_age_s, min_age_s=older_than_s
        )
        users: dict[int, UserRef] = {}
        for message in owed:
            if message.user.telegram_id not in self._swept:
                users.setdefault(message.user.telegram_id, message.user)
        for user in users.values():
            self._swept.add(user.telegram_id)
            self.answer_soon(bot, user, wait=False)  # a held lease: someone is answering them

    async def aclose(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop (a rolling update's SIGTERM): replies under way get ``grace_s`` to finish; what
        is cut off stays owed, its lease is released at once, and another replica's sweep
        writes the reply into the message this one had started."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _drain(self, bot: Bot, user: UserRef, wait: bool, from_id: int | None) -> None:
        assert self.replicas is not None
        try:
            async with self.replicas.lease(user.telegram_id, wait=wait) as held:
                if held is not None:
                    await self._answer_all(bot, user, from_id)
                elif wait:
                    logger.warning(
                        "user %s: lease busy too long, left to the sweep", user.telegram_id
                    )
        except LeaseLost as lost:  # stalled: whoever holds the lease now answers the rest
            logger.warning("user %s: stopped answering: %s", user.telegram_id, lost)
        except Exception:  # still owed in the database: the sweep tries again
            self.metrics.errors.inc()
            logger.exception("could not answer user %s", user.telegram_id)
        finally:
            self._swept.discard(user.telegram_id)

    async def _answer_all(
        self, bot: Bot, user: UserRef, from_id: int | None, before_id: int | None = None
    ) -> None:
        """Under the lease: each owed message, oldest first, each seeing the history before it,
        and each /reset or /forget in its place among them, up to the first message typed on
        the Mini App's page still waiting for its answer: only that page's request answers it
        (it waits for this lease), then what follows it. ``before_id``: that request's own
        message; what is owed before it is answered (other pages' messages passed over: each
        is answered by its own request).

        What counts as too late to answer is fixed when the lease is taken, so a message does
        not age out while it waits behind the user's earlier ones. A page message blocks the
        line only while its request may still be waiting for the lease (one whose replica died
        is passed over after that).
        """
        assert self.replicas is not None
        tried: set[int] = set()
        since = datetime.now(UTC)
        while True:
            owed = await self.dialogue.unanswered(
                self.settings.pending_reply_max_age_s,
                telegram_id=user.telegram_id,
                since=since,
                from_id=from_id,
                pages_younger_than_s=self.replicas.wait_s + self.replicas.lease_s,
            )
            if before_id is not None:  # a page's request: only what is owed in Telegram before it
                owed = [m for m in owed if m.message_id < before_id and not m.is_from_page]
            message = next((m for m in owed if m.message_id not in tried), None)
            if message is None or message.is_from_page:  # its page's request answers it
                return
            tried.add(message.message_id)
            turn = self.dialogue.take_turn(user)  # in line with this replica's own answers
            turn.mark_stored()
            try:
                await self._answer_owed(bot, turn, message)
            finally:
                turn.finish()

    # -- answering: the one path ----------------------------------------------------------------

    async def _answer_owed(self, bot: Bot, turn: Turn, owed: OwedMessage) -> None:
        """Where the start-up pass and the sweep enter: a stored command is carried out, a
        stored message answered, as if it had just arrived."""
        if owed.is_command:
            await turn.wait_to_answer()
            await self._carry_out(bot, owed)
        else:
            await self._answer(bot, turn, owed)

    async def _carry_out(self, bot: Bot, command: OwedMessage) -> None:
        """Carry out a stored /reset or /forget whose turn has come (the replies before it are
        delivered), then tell the user, in the topic it was sent in. The deletion comes first:
        if telling fails, the history is gone all the same and the user can ask again."""
        check_lease()  # with replicas: only while this replica holds the user's lease
        await self.dialogue.carry_out(
            command.user, command.message_id, command.role, command.thread_id
        )
        await bot.send_message(
            command.user.telegram_id,
            done_text(command.role, command.thread_id),
            message_thread_id=command.thread_id,
        )

    async def _answer(self, bot: Bot, turn: Turn, message: OwedMessage) -> None:
        """Answer the stored user ``message`` in the user's chat, in turn: a reply delivered
        and stored, or the message settled (``DialogueService.settle``) when the user got a
        notice instead (busy, too slow) or the chat takes no messages from the bot (blocked,
        left it).

        The reply is stored only after Telegram took all of it: a reply that never reached the
        user leaves the message unanswered, to be answered at the next start. The chat is
        ``user.telegram_id``: a memory is a private chat's user or a group (see ``user_ref``),
        and a private chat's id is its user's id. ``message.draft_id``: the bot's message an
        earlier attempt (killed, or a replica that died) was streaming this reply into; the
        reply is finished there. The message this attempt writes into is stored with the
        user's message as soon as it exists.

        The reply quotes the message it answers where a bare reply could be taken for an
        answer to something else: in a group (several people talk to the bot), and when the
        user has written again since (messages sent in a burst, a reply owed from before a
        restart), as it stands when the reply's message is sent (a message written while the
        reply was generated counts).
        """
        await turn.wait_to_answer()
        started = time.perf_counter()
        user, message_id, dialogue = message.user, message.message_id, self.dialogue
        if message.draft_id is not None:
            logger.info(
                "message %d: an earlier attempt died mid-reply; replying in its place", message_id
            )

        async def quote_needed() -> bool:
            return user.telegram_id < 0 or await dialogue.wrote_after(message_id)

        stream = ReplyStream(
            bot,
            user.telegram_id,
            self.settings.stream_edit_interval_s,
            thread_id=message.thread_id,
            resume_message_id=message.draft_id,
            on_sent=functools.partial(dialogue.remember_draft, message_id),
            quote_message_id=message.telegram_message_id,
            quote_when=quote_needed,
            drafts=self.drafts,
            draft_id=message_id,
            outage_s=self.settings.telegram_outage_s,
            # Only another replica can note a message for this reply meanwhile (one that lost
            # the lease while its message was on the way); alone, the question is a wasted read.
            noted_message=(
                functools.partial(dialogue.reply_draft, message_id) if self.replicas else None
            ),
        )
        on_text = stream.update if self.settings.stream_replies else None
        try:
            try:
                async with TypingIndicator.typing(
                    bot=bot, chat_id=user.telegram_id, message_thread_id=message.thread_id
                ):
                    reply = await dialogue.make_reply(
                        user,
                        message_id,
                        on_text=on_text,
                        thread_id=message.thread_id,
                        author=message.author,
                    )
            except (EngineBusy, EngineTimeout) as refusal:
                self.metrics.busy.inc()
                # replaces whatever was streamed
                await stream.finish(
                    texts.BUSY if isinstance(refusal, EngineBusy) else texts.TIMEOUT
                )
                await dialogue.settle(message_id)  # the user was told to try again: no late answer
                return
            self.metrics.generation_seconds.observe(time.perf_counter() - started)
            await stream.finish(reply)  # the final text is the one stored next
        except TelegramForbiddenError as error:
            # Blocked by the user, or no longer in the group: no answer can reach this chat, so
            # it is not tried again (a replica's sweep used to generate the reply anew every few
            # seconds for as long as the message was young enough, a single bot at every start).
            logger.warning(
                "chat %s: the bot may not write there (%s); reply dropped",
                user.telegram_id,
                error.message,
            )
            await dialogue.settle(message_id)
            return
        check_lease()  # with replicas: not if another replica has taken over this user meanwhile
        if not await dialogue.store_reply(user, reply, message_id, author=message.author):
            # This replica stalled past its lease after the check above: another one answered.
            logger.warning(
                "message %d was answered meanwhile by another replica: this reply is not stored",
                message_id,
            )
            return
        self.metrics.replies.inc()
