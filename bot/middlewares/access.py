"""Who may talk to the bot, and counting what arrives."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiogram import BaseMiddleware
from aiogram.types import Message, TelegramObject

from bot import texts
from bot.metrics import BotMetrics

logger = logging.getLogger(__name__)

Handler = Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]]


class AllowlistMiddleware(BaseMiddleware):
    """With ``ALLOWED_USER_IDS`` set, everyone else gets one polite refusal and nothing is stored.

    It runs before any handler, so a refused user never reaches the database.
    """

    def __init__(self, allowed: frozenset[int]) -> None:
        self.allowed = allowed
        self.refused: set[int] = set()

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        if not self.allowed or not isinstance(event, Message):
            return await handler(event, data)
        sender = event.from_user
        if sender is not None and sender.id in self.allowed:
            return await handler(event, data)
        key = sender.id if sender is not None else event.chat.id
        if key not in self.refused:
            self.refused.add(key)
            logger.info("refused a user who is not on the allowlist")
            if event.chat.type == "private":
                await event.answer(texts.NOT_ALLOWED)
        return None


class CountUpdatesMiddleware(BaseMiddleware):
    def __init__(self, metrics: BotMetrics) -> None:
        self.metrics = metrics

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        self.metrics.updates.inc()
        return await handler(event, data)
