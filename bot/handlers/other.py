"""Anything that is not text (stickers, photos, voice...): a short polite reply; and a group's
upgrade to a supergroup (a service message), whose memory moves to the new chat id."""

from __future__ import annotations

import logging

from aiogram import F, Router
from aiogram.types import Message

from bot import texts
from bot.dialogue import DialogueService
from bot.handlers.chat import AddressedToBot

logger = logging.getLogger(__name__)


async def not_text(message: Message) -> None:
    await message.answer(texts.NOT_TEXT)


async def group_upgraded(message: Message, dialogue: DialogueService) -> None:
    """Telegram gives a group that becomes a supergroup a new chat id, and the supergroup's
    first message says which id it came from: without this, the bot forgot the group's whole
    conversation and its /temp at the upgrade (one happens when a group grows past 200 members
    or an admin turns on a supergroup feature)."""
    old = message.migrate_from_chat_id
    if old is not None and await dialogue.move_chat(old, message.chat.id):
        logger.info("chat %s is now %s: its memory moved with it", old, message.chat.id)


def make_router() -> Router:
    router = Router(name="other")
    router.message.register(group_upgraded, F.migrate_from_chat_id)
    router.message.register(not_text, AddressedToBot())  # silence in groups unless addressed
    return router
