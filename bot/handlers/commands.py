"""/start, /help, /reset, /temp."""

from __future__ import annotations

from aiogram import Router
from aiogram.filters import Command, CommandObject, CommandStart
from aiogram.types import Message

from bot import texts
from bot.config import Settings
from bot.dialogue import DialogueService, UserRef
from bot.metrics import BotMetrics


def user_ref(message: Message) -> UserRef:
    """Whose memory a message belongs to: the user's in a private chat, the chat's in a group.

    Group chat ids are negative and user ids positive, so the two can never collide.
    """
    sender = message.from_user
    if message.chat.type != "private" or sender is None:
        return UserRef(message.chat.id, message.chat.title)
    return UserRef(sender.id, sender.full_name)


async def start(message: Message, dialogue: DialogueService) -> None:
    user = user_ref(message)
    await dialogue.get_temperature(user)  # registers the user
    await message.answer(texts.START.format(name=user.name or "друг"))


async def help_(message: Message, settings: Settings) -> None:
    await message.answer(
        texts.HELP.format(low=settings.temperature_min, high=settings.temperature_max)
    )


async def reset(message: Message, dialogue: DialogueService) -> None:
    user = user_ref(message)
    async with dialogue.exclusive(user):  # after this user's earlier messages are answered
        await dialogue.reset(user)
    await message.answer(texts.RESET_DONE)


async def temp(message: Message, command: CommandObject, dialogue: DialogueService) -> None:
    await message.answer(await dialogue.temperature_command(user_ref(message), command.args))


async def forget(message: Message, dialogue: DialogueService) -> None:
    user = user_ref(message)
    async with dialogue.exclusive(user):
        await dialogue.forget(user)
    await message.answer(texts.FORGET_DONE)


async def stats(
    message: Message, dialogue: DialogueService, settings: Settings, metrics: BotMetrics
) -> None:
    if message.from_user is None or message.from_user.id not in settings.admin_ids:
        await message.answer(texts.ADMINS_ONLY)
        return
    await message.answer(await dialogue.stats_text(metrics.started))


def make_router() -> Router:
    """A fresh Router (a Router can belong to one dispatcher only)."""
    router = Router(name="commands")
    router.message.register(start, CommandStart())
    router.message.register(help_, Command("help"))
    router.message.register(reset, Command("reset"))
    router.message.register(temp, Command("temp"))
    router.message.register(forget, Command("forget"))
    router.message.register(stats, Command("stats"))
    return router
