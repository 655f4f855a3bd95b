"""Text messages: remember, generate (typing shown meanwhile), answer, remember the answer."""

from __future__ import annotations

import logging
import re
import time

from aiogram import Bot, F, Router
from aiogram.filters import BaseFilter
from aiogram.types import Message
from aiogram.utils.chat_action import ChatActionSender

from bot import texts
from bot.config import Settings
from bot.dialogue import DialogueService, clean_user_text
from bot.engine import EngineBusy, EngineTimeout
from bot.handlers.commands import user_ref
from bot.metrics import BotMetrics
from bot.streaming import ReplyStream

logger = logging.getLogger(__name__)


class AddressedToBot(BaseFilter):
    """In a private chat, always; in a group, only a mention of the bot or a reply to it.

    Commands are matched by their own filters (which also honour ``/cmd@thisbot``), so a group
    hears from the bot only when someone speaks to it.
    """

    async def __call__(self, message: Message, bot: Bot) -> bool:
        if message.chat.type == "private":
            return True
        me = await bot.me()
        replied = message.reply_to_message
        if replied is not None and replied.from_user is not None and replied.from_user.id == me.id:
            return True
        return bool(me.username) and f"@{me.username}".lower() in (message.text or "").lower()


async def chat(
    message: Message, bot: Bot, dialogue: DialogueService, metrics: BotMetrics, settings: Settings
) -> None:
    user = user_ref(message)
    turn = dialogue.take_turn(user)  # first, before any await: fixes this message's place
    try:
        text = message.text or ""
        if message.chat.type != "private":
            me = await bot.me()
            text = re.sub(rf"@{re.escape(me.username or '')}\b", " ", text, flags=re.IGNORECASE)
        text = clean_user_text(text)
        if not text:
            await message.answer(texts.NOT_TEXT)
            return
        await turn.wait_to_store()
        message_id = await dialogue.remember_user_message(user, text)
        turn.mark_stored()
        await turn.wait_to_answer()
        started = time.perf_counter()
        stream = ReplyStream(bot, message, settings.stream_edit_interval_s)
        on_text = stream.update if settings.stream_replies else None
        try:
            async with ChatActionSender.typing(bot=bot, chat_id=message.chat.id):
                reply = await dialogue.make_reply(user, message_id, on_text=on_text)
        except EngineBusy:
            metrics.busy.inc()
            await stream.finish(texts.BUSY)
            return
        except EngineTimeout:
            metrics.busy.inc()
            await stream.finish(texts.TIMEOUT)  # replaces whatever was streamed
            return
        metrics.generation_seconds.observe(time.perf_counter() - started)
        # Stored before the last edit, which may wait out the per-chat edit interval: the user
        # has been reading the reply for a while already. The final text is the stored one.
        await dialogue.store_reply(user, reply)
        metrics.replies.inc()
        await stream.finish(reply)
    finally:
        turn.finish()


def make_router() -> Router:
    router = Router(name="chat")
    router.message.register(chat, F.text, AddressedToBot())
    return router
