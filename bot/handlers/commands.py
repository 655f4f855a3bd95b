"""/start, /help, /reset, /temp, /forget, /stats."""

from __future__ import annotations

from aiogram import Bot, Router
from aiogram.filters import Command, CommandObject, CommandStart
from aiogram.types import Message

from bot import texts
from bot.chats import may_change_shared_memory, user_ref
from bot.config import Settings
from bot.conversation import Conversations
from bot.db import repository
from bot.dialogue import DialogueService
from bot.metrics import BotMetrics


async def start(message: Message, dialogue: DialogueService) -> None:
    user = user_ref(message)
    await dialogue.get_temperature(user)  # registers the user
    await message.answer(texts.START.format(name=user.name or "друг"))


async def help_(message: Message, settings: Settings) -> None:
    await message.answer(
        texts.HELP.format(low=settings.temperature_min, high=settings.temperature_max)
    )


async def reset(message: Message, bot: Bot, conversations: Conversations) -> None:
    await conversations.receive_command(bot, message, repository.RESET_ROLE)


async def temp(
    message: Message,
    command: CommandObject,
    bot: Bot,
    settings: Settings,
    dialogue: DialogueService,
) -> None:
    wants_change = bool(command.args and command.args.strip())
    if wants_change and not await may_change_shared_memory(message, bot, settings):
        await message.answer(texts.GROUP_ADMINS_ONLY)
        return
    await message.answer(await dialogue.temperature_command(user_ref(message), command.args))


async def forget(message: Message, bot: Bot, conversations: Conversations) -> None:
    await conversations.receive_command(bot, message, repository.FORGET_ROLE)


async def stats(
    message: Message, dialogue: DialogueService, settings: Settings, metrics: BotMetrics
) -> None:
    if message.from_user is None or message.from_user.id not in settings.admin_ids:
        await message.answer(texts.ADMINS_ONLY)
        return
    refusals = texts.STATS_REFUSALS.format(
        busy=metrics.count("bot_busy"), throttled=metrics.count("bot_throttled")
    )
    await message.answer(await dialogue.stats_text(metrics.started) + "\n" + refusals)


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
