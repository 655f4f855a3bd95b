"""Replies owed from before a restart: every recent message the user never got an answer to.

A user's message is stored before its reply is generated, and the reply is stored only after
Telegram took it (bot.handlers.chat.answer). So after ``kill -9`` mid-reply, or when Telegram
refused a reply for longer than the retries, the message sits in the database with no reply
pointing at it, and the user would wait forever. At start, before the first update is taken,
each such message younger than ``PENDING_REPLY_MAX_AGE_S`` takes its user's turn, in the order
the messages were stored, and is answered through the same path as a new message: a message the
user sends meanwhile is answered after it, and sees it in its history. Older ones stay in the
history unanswered (a reply hours late would confuse more than help).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from aiogram import Bot

from bot.config import Settings
from bot.dialogue import DialogueService, Turn
from bot.handlers.chat import answer
from bot.metrics import BotMetrics

logger = logging.getLogger(__name__)


async def answer_unanswered(
    bot: Bot, dialogue: DialogueService, metrics: BotMetrics, settings: Settings
) -> list[asyncio.Task[None]]:
    """Queue an answer to each unanswered recent message; returns the tasks that answer them.

    The turns are all taken before this returns (call it before updates are handled), so the
    answers keep per-user order ahead of anything that arrives after the start.
    """
    if settings.pending_reply_max_age_s <= 0:
        return []
    pending = await dialogue.unanswered(settings.pending_reply_max_age_s)
    if pending:
        logger.info("answering %d message(s) left unanswered before the start", len(pending))
    tasks = []
    for user, message_id in pending:
        turn = dialogue.take_turn(user)
        turn.mark_stored()
        answering = functools.partial(
            answer, bot, dialogue, metrics, settings, turn, user, message_id
        )
        tasks.append(asyncio.create_task(_settle(answering, turn, metrics)))
    return tasks


async def _settle(
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
