"""Text messages: each is handed to the conversation layer (bot.conversation), which stores
and answers it; an edit changes what the bot remembers."""

from __future__ import annotations

import logging

from aiogram import Bot, F, Router
from aiogram.filters import BaseFilter
from aiogram.types import Message

from bot import texts
from bot.chats import remembered_text, user_ref
from bot.conversation import Conversations
from bot.dialogue import DialogueService

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


async def chat(message: Message, bot: Bot, conversations: Conversations) -> None:
    """A message to the bot: stored and answered in its turn (bot.conversation)."""
    # No wait here: in a group the filter above already fetched the bot's account, so the
    # message's place in line is still the order in which its update arrived.
    text = await remembered_text(message, bot)
    if not text:  # only the bot's name ("@bot" to call it), or nothing a model can read
        await message.answer(texts.LISTENING)
        return
    await conversations.receive_text(bot, message, text)


async def edited(message: Message, bot: Bot, dialogue: DialogueService) -> None:
    """A user edited a message: if the bot stored it, its memory takes the new text. Nothing
    is sent (the reply already given stays); an edit of a message the bot never stored (in a
    group, one not addressed to it) changes nothing."""
    text = await remembered_text(message, bot)
    if text and await dialogue.edit_user_message(user_ref(message), message.message_id, text):
        logger.info("chat %s: message %d edited", message.chat.id, message.message_id)


def make_router() -> Router:
    router = Router(name="chat")
    router.message.register(chat, F.text, AddressedToBot())
    router.edited_message.register(edited, F.text)
    return router
