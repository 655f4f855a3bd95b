"""Replies owed from before a restart: every recent message the user never got an answer to.

A user's message is stored before its reply is generated, and the reply is stored only after
Telegram took it (bot.handlers.chat.answer). So after ``kill -9`` mid-reply, or when Telegram
refused a reply for longer than the retries, the message sits in the database with no reply
pointing at it, and the user would wait forever. At start, before the first update is taken,
each such message younger than ``PENDING_REPLY_MAX_AGE_S`` takes its user's turn, in the order
the messages were stored, and is answered through the same path as a new message: a message the
user sends meanwhile is answered after it, and sees it in its history. Older ones stay in the
history unanswered (a reply hours late would confuse more than help).

With several replicas (``REDIS_URL``, bot.replicas) there is no "start" to wait for: a replica
may die at any moment while others go on. :class:`OwedReplies` answers a user's owed messages
under the user's lease, and its sweep keeps looking for owed messages whose lease is free.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiogram import Bot

from bot.config import Settings
from bot.dialogue import DialogueService, OwedMessage, Turn, UserRef
from bot.handlers.chat import answer
from bot.handlers.commands import carry_out
from bot.metrics import BotMetrics
from bot.replicas import LeaseLost, ReplicaCoordinator

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10.0


async def answer_unanswered(
    bot: Bot, dialogue: DialogueService, metrics: BotMetrics, settings: Settings
) -> list[asyncio.Task[None]]:
    """Queue an answer to each unanswered recent message; returns the tasks that answer them.

    The turns are all taken before this returns (call it before updates are handled), so the
    answers keep per-user order ahead of anything that arrives after the start.
    """
    # with PENDING_REPLY_MAX_AGE_S=0 no message is answered late, but a /reset left by
    # replicas (bot.replicas) is still carried out
    pending = await dialogue.unanswered(settings.pending_reply_max_age_s)
    if pending:
        logger.info("answering %d message(s) left unanswered before the start", len(pending))
    tasks = []
    for message in pending:
        turn = dialogue.take_turn(message.user)
        turn.mark_stored()
        if message.is_command:
            answering = functools.partial(_carry_out_in_turn, bot, dialogue, turn, message)
        else:
            answering = functools.partial(
                answer,
                bot,
                dialogue,
                metrics,
                settings,
                turn,
                message,
            )
        tasks.append(asyncio.create_task(_run_in_turn(answering, turn, metrics)))
    return tasks


async def _carry_out_in_turn(
    bot: Bot, dialogue: DialogueService, turn: Turn, command: OwedMessage
) -> None:
    await turn.wait_to_answer()
    await carry_out(bot, dialogue, command)


async def _run_in_turn(
    answering: Callable[[], Awaitable[None]], turn: Turn, metrics: BotMetrics
) -> None:
    """Run one answer; whatever happens, the user's next turn may go on."""
    try:
        await answering()
    except Exception:  # it stays unanswered in the database: the next start tries again
        metrics.errors.inc()
        logger.exception("could not answer a message left from before the start")
    finally:
        turn.finish()


class OwedReplies:
    """Answers users' owed messages in order, on whichever replica holds the user's lease."""

    def __init__(
        self,
        bot: Bot,
        dialogue: DialogueService,
        metrics: BotMetrics,
        settings: Settings,
        replicas: ReplicaCoordinator,
    ) -> None:
        self.bot, self.dialogue, self.metrics = bot, dialogue, metrics
        self.settings, self.replicas = settings, replicas
        self._tasks: set[asyncio.Task[None]] = set()
        self._swept: set[int] = set()  # users this replica's sweep is answering now

    def answer_soon(self, user: UserRef, wait: bool = True, from_id: int | None = None) -> None:
        """Answer what ``user`` is owed, in the background (the update is acknowledged first);
        each reply goes to the forum topic stored with its message. ``from_id``: the message
        just stored, answered (with all after it) however long the user's queue takes, and
        whatever PENDING_REPLY_MAX_AGE_S says of late replies."""
        task = asyncio.create_task(self._drain(user, wait, from_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, user: UserRef, wait: bool, from_id: int | None) -> None:
        try:
            async with self.replicas.lease(user.telegram_id, wait=wait) as held:
                if held is not None:
                    await self._answer_all(user, from_id)
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

    async def _answer_all(self, user: UserRef, from_id: int | None) -> None:
        """Under the lease: each owed message, oldest first, each seeing the history before it,
        and each /reset or /forget in its place among them.

        What counts as too late to answer is fixed when the lease is taken, so a message does
        not age out while it waits behind the user's earlier ones.
        """
        tried: set[int] = set()
        since = datetime.now(UTC)
        while True:
            owed = await self.dialogue.unanswered(
                self.settings.pending_reply_max_age_s,
                telegram_id=user.telegram_id,
                since=since,
                from_id=from_id,
            )
            message = next((m for m in owed if m.message_id not in tried), None)
            if message is None:
                return
            tried.add(message.message_id)
            turn = self.dialogue.take_turn(user)  # in line with this replica's own answers
            turn.mark_stored()
            try:
                if message.is_command:
                    await _carry_out_in_turn(self.bot, self.dialogue, turn, message)
                    continue
                await answer(self.bot, self.dialogue, self.metrics, self.settings, turn, message)
            finally:
                turn.finish()

    async def sweep_forever(self) -> None:
        """Every REPLICA_SWEEP_INTERVAL_S: answer owed messages nobody is answering (a replica
        died holding them, Redis was briefly down, Telegram refused a reply), and at start what
        the whole deployment left owed."""
        interval = self.settings.replica_sweep_interval_s
        while True:
            try:
                await self.sweep_once(older_than_s=interval)
            except Exception:
                logger.exception("sweep for owed replies failed")
            await asyncio.sleep(interval)

    async def sweep_once(self, older_than_s: float = 0.0) -> None:
        owed = await self.dialogue.unanswered(
            self.settings.pending_reply_max_age_s, min_age_s=older_than_s
        )
        users: dict[int, UserRef] = {}
        for message in owed:
            if message.user.telegram_id not in self._swept:
                users.setdefault(message.user.telegram_id, message.user)
        for user in users.values():
            self._swept.add(user.telegram_id)
            self.answer_soon(user, wait=False)  # a held lease: someone is answering them

    async def aclose(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop (a rolling update's SIGTERM): replies under way get ``grace_s`` to finish; what
        is cut off stays owed, its lease is released at once, and another replica's sweep
        writes the reply into the message this one had started."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
