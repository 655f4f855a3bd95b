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


class AccessMiddleware(BaseMiddleware):
    """Who may talk to the bot. ``BLOCKED_USER_IDS`` are ignored: no answer, nothing stored, in
    private chats and groups alike (an operator's answer to an abusive user, who is not told,
    so as not to invite a new account). With ``ALLOWED_USER_IDS`` set, everyone else gets one
    polite refusal and nothing is stored.

    It runs before any handler, so a refused or blocked user never reaches the database.
    """

    def __init__(self, allowed: frozenset[int], blocked: frozenset[int] = frozenset()) -> None:
        self.allowed, self.blocked = allowed, blocked
        self.refused: set[int] = set()

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        if not isinstance(event, Message) or not (self.allowed or self.blocked):
            return await handler(event, data)
        sender = event.from_user
        if sender is not None and sender.id in self.blocked:
            logger.debug("ignored a message from blocked user %s", sender.id)
            return None
        if not self.allowed or (sender is not None and sender.id in self.allowed):
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
