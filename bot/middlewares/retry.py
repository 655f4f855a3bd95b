"""Retries for calls to the Bot API, so flood control and network trouble never lose a reply.

* ``429 Too Many Requests`` (:class:`TelegramRetryAfter`): wait exactly ``retry_after`` seconds,
  as Telegram asks, then send again.
* Network errors and 5xx answers: retry with exponential backoff and jitter.

Polling (getUpdates) is left to aiogram's own loop, which already backs off and keeps polling.
Neither the "typing…" indicator nor a reply's draft (``sendMessageDraft``, a preview the next
update replaces) is worth a retry: retried, a draft held the reply's stream up to 7.5 s of
backoff while Telegram failed, a preview of text long since grown.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from aiogram import Bot
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.exceptions import TelegramNetworkError, TelegramRetryAfter, TelegramServerError
from aiogram.methods import GetUpdates, SendChatAction, SendMessageDraft, TelegramMethod
from aiogram.methods.base import Response

logger = logging.getLogger(__name__)


class RetryMiddleware(BaseRequestMiddleware):
    """Send again after flood control and transient failures, up to ``attempts`` tries."""

    def __init__(
        self,
        attempts: int = 5,
        base_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        max_retry_after_s: float = 120.0,
    ) -> None:
        self.attempts = attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.max_retry_after_s = max_retry_after_s

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[Any],
        bot: Bot,
        method: TelegramMethod[Any],
    ) -> Response[Any]:
        if isinstance(method, GetUpdates | SendChatAction | SendMessageDraft):
            return await make_request(bot, method)  # polling retries itself; the rest is optional
        for attempt in range(1, self.attempts + 1):
            try:
                return await make_request(bot, method)
            except TelegramRetryAfter as error:
                if attempt == self.attempts or error.retry_after > self.max_retry_after_s:
                    raise
                logger.warning(
                    "flood control on %s: waiting %s s", type(method).__name__, error.retry_after
                )
                await asyncio.sleep(error.retry_after)
            except (TelegramNetworkError, TelegramServerError) as error:
                if attempt == self.attempts:
                    raise
                delay = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
                delay *= 1 + random.random() * 0.1
                logger.warning(
                    "%s failed (%s), retry %d in %.1f s",
                    type(method).__name__,
                    type(error).__name__,
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")
