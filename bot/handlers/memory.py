"""/memory: what the bot remembers about the user, each fact with a button to forget it;
/memory off and /memory on."""

from __future__ import annotations

from aiogram import Bot, F, Router
from aiogram.filters import Command, CommandObject
from aiogram.types import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message

from bot import texts
from bot.chats import may_change_shared_memory, user_ref
from bot.config import Settings
from bot.dialogue import DialogueService, UserRef
from bot.facts import KINDS, describe_memory

#: A forget button's callback data: the prefix and the fact's id.
FORGET_PREFIX = "forget-fact:"


async def _listing(
    dialogue: DialogueService, user: UserRef
) -> tuple[str, InlineKeyboardMarkup | None]:
    enabled, facts = await dialogue.memory(user)
    text = describe_memory(enabled, facts)
    buttons = [
        [
            InlineKeyboardButton(
                text=texts.MEMORY_FORGET_BUTTON.format(kind=KINDS.get(kind, kind)),
                callback_data=f"{FORGET_PREFIX}{fact_id}",
            )
        ]
        for fact_id, kind, _ in facts
    ]
    return text, InlineKeyboardMarkup(inline_keyboard=buttons) if buttons else None


async def memory(
    message: Message,
    command: CommandObject,
    bot: Bot,
    settings: Settings,
    dialogue: DialogueService,
) -> None:
    user = user_ref(message)
    argument = (command.args or "").strip().lower()
    if not argument:
        text, keyboard = await _listing(dialogue, user)
        await message.answer(text, reply_markup=keyboard)
        return
    if argument not in {"on", "off"}:
        await message.answer(texts.MEMORY_USAGE)
        return
    if not await may_change_shared_memory(message, bot, settings):
        await message.answer(texts.GROUP_ADMINS_ONLY)
        return
    await dialogue.set_memory(user, argument == "on")
    await message.answer(texts.MEMORY_ON if argument == "on" else texts.MEMORY_OFF)


async def forget_fact(callback: CallbackQuery, dialogue: DialogueService) -> None:
    """A forget button: only ever the presser's own fact (the delete is scoped to their id, so
    a forged callback naming another user's fact deletes nothing); the list is shown again."""
    try:
        fact_id = int((callback.data or "")[len(FORGET_PREFIX) :])
    except ValueError:
        await callback.answer()
        return
    shown = callback.message
    if not isinstance(shown, Message) or shown.chat.type != "private":
        await callback.answer()  # facts are kept for private chats only (bot.facts)
        return
    user = UserRef(callback.from_user.id, callback.from_user.full_name)
    forgotten = await dialogue.forget_fact(user, fact_id)
    await callback.answer(texts.MEMORY_FORGOTTEN if forgotten else texts.MEMORY_GONE)
    text, keyboard = await _listing(dialogue, user)
    await shown.edit_text(text, reply_markup=keyboard)


def make_router() -> Router:
    router = Router(name="memory")
    router.message.register(memory, Command("memory"))
    router.callback_query.register(forget_fact, F.data.startswith(FORGET_PREFIX))
    return router
