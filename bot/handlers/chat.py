"""Text messages: remember, generate (typing shown meanwhile), answer, remember the answer."""

from __future__ import annotations

import logging

from aiogram import Bot, F, Router
from aiogram.types import Message
from aiogram.utils.chat_action import ChatActionSender

from bot import texts
from bot.dialogue import DialogueService, clean_user_text, split_message
from bot.engine import EngineBusy, EngineTimeout
from bot.handlers.commands import user_ref

logger = logging.getLogger(__name__)


async def chat(message: Message, bot: Bot, dialogue: DialogueService) -> None:
    text = clean_user_text(message.text or "")
    if not text:
        await message.answer(texts.NOT_TEXT)
        return
    user = user_ref(message)
    message_id = await dialogue.remember_user_message(user, text)
    async with dialogue.lock_for(user):  # this user's messages are answered in order
        try:
            async with ChatActionSender.typing(bot=bot, chat_id=message.chat.id):
                reply = await dialogue.make_reply(user, message_id)
        except EngineBusy:
            await message.answer(texts.BUSY)
            return
        except EngineTimeout:
            await message.answer(texts.TIMEOUT)
            return
        for piece in split_message(reply):
            await message.answer(piece)
        await dialogue.store_reply(user, reply)


def make_router() -> Router:
    router = Router(name="chat")
    router.message.register(chat, F.text)
    return router
