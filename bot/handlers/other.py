"""Anything that is not text (stickers, photos, voice...): a short polite reply."""

from __future__ import annotations

from aiogram import Router
from aiogram.types import Message

from bot import texts
from bot.handlers.chat import AddressedToBot


async def not_text(message: Message) -> None:
    await message.answer(texts.NOT_TEXT)


def make_router() -> Router:
    router = Router(name="other")
    router.message.register(not_text, AddressedToBot())  # silence in groups unless addressed
    return router
