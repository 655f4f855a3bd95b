"""A per-sender rate limit: at most RATE_LIMIT_MESSAGES messages to the bot in each
RATE_LIMIT_WINDOW_S (aiogram 3 has no throttling of its own).

Why: each user's messages are answered one at a time, so a flooding user cannot starve the
others of the model, but every message of theirs is still stored and answered: a script sending
a message a second holds one of the model's rows for as long as it runs, grows the database
without bound, and gets hundreds of replies. Past the limit a message is dropped (neither stored
nor answered) and its sender is told once per window, so the bot does not flood them back.

The count is per sender, not per chat: in a group the one who floods is limited, not everyone
talking to the bot there. A window starts with a sender's first message and lasts
RATE_LIMIT_WINDOW_S; the next message after it starts a new one (so a steady sender may pass up
to twice the limit across two windows' edge: enough to stop a flood, and nothing to keep).
With replicas (``REDIS_URL``) the count lives in Redis, so the limit holds whichever replica
gets which message; should Redis fail, messages pass (a limit must not silence the bot).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from aiogram import BaseMiddleware
from aiogram.types import Message, TelegramObject
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot import texts
from bot.metrics import BotMetrics
from bot.middlewares.access import Handler
from bot.replicas import PREFIX

logger = logging.getLogger(__name__)


class WindowCounter(Protocol):
    async def hit(self, sender: int) -> int:
        """Count one message of ``sender``; how many they sent in this window, it included."""
        ...


class LocalWindowCounter:
    """The count in this process (one bot, no replicas)."""

    #: Past this many senders, those whose window has ended are dropped.
    PRUNE_AT = 10_000

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self._counts: dict[int, tuple[float, int]] = {}  # sender -> (window's start, count)

    async def hit(self, sender: int) -> int:
        now = self.clock()
        started, count = self._counts.get(sender, (now, 0))
        if now - started >= self.window_s:
            started, count = now, 0
        self._counts[sender] = (started, count + 1)
        if len(self._counts) > self.PRUNE_AT:
            self._counts = {k: v for k, v in self._counts.items() if now - v[0] < self.window_s}
        return count + 1


class RedisWindowCounter:
    """The count in Redis, shared by all replicas: one key per sender, made with the window's
    first message to expire RATE_LIMIT_WINDOW_S later (SET ... NX PX) and counted up (INCR),
    both in one transaction, so no key is ever left without its expiry."""

    def __init__(self, redis: Redis, window_s: float) -> None:
        self.redis, self.window_s = redis, window_s

    async def hit(self, sender: int) -> int:
        key = f"{PREFIX}:rate:{sender}"
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(key, 0, px=int(self.window_s * 1000), nx=True)  # a new window
                pipe.incr(key)  # keeps the window's expiry
                _, count = await pipe.execute()
        except (RedisError, OSError) as error:
            logger.warning("rate limit not checked, Redis failed: %s", error)
            return 0
        return int(count)


class MessageRateLimit(BaseMiddleware):
    """Drops a sender's messages past ``limit`` in a window; tells them once per window.

    An inner middleware: it runs only for messages a handler takes (addressed to the bot), so
    group talk the bot ignores is not counted. ``exempt``: the bot's admins.
    """

    def __init__(
        self,
        limit: int,
        window_s: float,
        counter: WindowCounter,
        metrics: BotMetrics,
        exempt: frozenset[int] = frozenset(),
    ) -> None:
        self.limit, self.window_s, self.counter = limit, window_s, counter
        self.metrics, self.exempt = metrics, exempt

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        if not isinstance(event, Message) or event.migrate_from_chat_id is not None:
            return await handler(event, data)  # a group's upgrade is no one's message
        sender = event.from_user.id if event.from_user is not None else event.chat.id
        if sender in self.exempt:
            return await handler(event, data)
        count = await self.counter.hit(sender)
        if count <= self.limit:
            return await handler(event, data)
        self.metrics.throttled.inc()
        if count == self.limit + 1:  # the first one over: say so, once this window
            logger.info("sender %s: over %d messages in %g s", sender, self.limit, self.window_s)
            notice = texts.TOO_MANY.format(limit=self.limit, seconds=f"{self.window_s:g}")
            if event.chat.type == "private":
                await event.answer(notice)
            else:  # in a group, to whoever it concerns
                await event.reply(notice)
        return None
