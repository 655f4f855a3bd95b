"""No Bot API call on behalf of a user whose lease this replica has lost (bot.replicas).

A replica that stalls longer than ``REPLICA_LEASE_S`` (a frozen VM, a stopped process) wakes up
mid-reply, perhaps with a request about to be sent again by :class:`RetryMiddleware`, while a
survivor has already answered the user; or Redis forgot its lock and another replica took the
user's lease. Registered inside the retry middleware, this check (the lease's deadline, then its
fencing token) runs before every attempt, so the replica's next message or edit never reaches
the user. Calls made outside a lease (one process, no replicas) pass untouched.
"""

from __future__ import annotations

from typing import Any

from aiogram import Bot
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.methods import SendChatAction, TelegramMethod
from aiogram.methods.base import Response

from bot.replicas import check_fence


class LeaseFenceMiddleware(BaseRequestMiddleware):
    """Raise :class:`bot.replicas.LeaseLost` instead of sending when the lease has run out."""

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[Any],
        bot: Bot,
        method: TelegramMethod[Any],
    ) -> Response[Any]:
        if not isinstance(method, SendChatAction):  # "typing…" changes nothing the user keeps
            await check_fence()
        return await make_request(bot, method)
