"""/start, /help, /reset, /temp, /forget, /stats."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiogram import Bot, Router
from aiogram.filters import Command, CommandObject, CommandStart
from aiogram.types import Message

from bot import texts
from bot.config import Settings
from bot.db import repository
from bot.dialogue import DialogueService, OwedMessage, UserRef
from bot.metrics import BotMetrics
from bot.replicas import check_lease

if TYPE_CHECKING:
    from bot.pending import OwedReplies


def user_ref(message: Message) -> UserRef:
    """Whose memory a message belongs to: the user's in a private chat, the chat's in a group.

    Group chat ids are negative and user ids positive, so the two can never collide.
    """
    sender = message.from_user
    if message.chat.type != "private" or sender is None:
        return UserRef(message.chat.id, message.chat.title)
    return UserRef(sender.id, sender.full_name)


def topic_of(message: Message) -> int | None:
    """The forum topic a message was written in; None outside topics (the General topic, a
    chat without topics, a reply thread in an ordinary group)."""
    return message.message_thread_id if message.is_topic_message else None


async def start(message: Message, dialogue: DialogueService) -> None:
    user = user_ref(message)
    await dialogue.get_temperature(user)  # registers the user
    await message.answer(texts.START.format(name=user.name or "друг"))


async def help_(message: Message, settings: Settings) -> None:
    await message.answer(
        texts.HELP.format(low=settings.temperature_min, high=settings.temperature_max)
    )


#: What Telegram calls a group's administrators in ``getChatMember``.
GROUP_ADMIN_STATUSES = frozenset({"creator", "administrator"})


async def may_change_shared_memory(message: Message, bot: Bot, settings: Settings) -> bool:
    """Whether the sender may reset, delete or retune the memory this chat shares: anyone in a
    private chat; in a group (one memory for everyone there, see ``user_ref``) the group's
    administrators, an administrator posting anonymously (as the group), and the bot's own
    admins (ADMIN_USER_IDS). Otherwise any member could wipe the group's conversation."""
    if message.chat.type == "private":
        return True
    if message.sender_chat is not None and message.sender_chat.id == message.chat.id:
        return True  # an anonymous administrator of this group
    sender = message.from_user
    if sender is None:
        return False
    if sender.id in settings.admin_ids:
        return True
    member = await bot.get_chat_member(message.chat.id, sender.id)
    return member.status in GROUP_ADMIN_STATUSES


async def reset(
    message: Message,
    bot: Bot,
    settings: Settings,
    dialogue: DialogueService,
    owed: OwedReplies | None = None,
) -> None:
    allowed = functools.partial(may_change_shared_memory, message, bot, settings)
    await _end_conversation(message, dialogue, owed, repository.RESET_ROLE, allowed)


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


async def forget(
    message: Message,
    bot: Bot,
    settings: Settings,
    dialogue: DialogueService,
    owed: OwedReplies | None = None,
) -> None:
    allowed = functools.partial(may_change_shared_memory, message, bot, settings)
    await _end_conversation(message, dialogue, owed, repository.FORGET_ROLE, allowed)


async def _end_conversation(
    message: Message,
    dialogue: DialogueService,
    owed: OwedReplies | None,
    role: str,
    allowed: Callable[[], Awaitable[bool]],
) -> None:
    """/reset or /forget (``role``), after the replies to the user's earlier messages, if the
    sender is ``allowed`` (awaited only once the command has its place in line: asking
    Telegram takes a moment, and a message sent after the command must stay after it)."""
    if owed is not None:
        await _store_in_line(message, dialogue, owed, role, allowed)
        return
    user = user_ref(message)
    async with dialogue.exclusive(user):  # after this user's earlier messages are answered
        if not await allowed():
            await message.answer(texts.GROUP_ADMINS_ONLY)
            return
        if role == repository.FORGET_ROLE:
            await dialogue.forget(user)
        else:
            await dialogue.reset(user, topic_of(message))
    await message.answer(done_text(role, topic_of(message)))


async def _store_in_line(
    message: Message,
    dialogue: DialogueService,
    owed: OwedReplies,
    role: str,
    allowed: Callable[[], Awaitable[bool]],
) -> None:
    """With replicas: store the command in line with the user's messages and leave it to
    whichever replica holds the user's lease, after the replies before it (bot.replicas).
    The webhook request is answered at once, never held while another replica is replying."""
    user = user_ref(message)
    turn = dialogue.take_turn(user)  # before any await, like a message
    try:
        await turn.wait_to_store()
        if not await allowed():
            await message.answer(texts.GROUP_ADMINS_ONLY)
            return
        stored = await dialogue.remember_command(user, role, message.message_id, topic_of(message))
        turn.mark_stored()
        if stored is not None:
            owed.answer_soon(user, from_id=stored)
    finally:
        turn.finish()


def done_text(role: str, thread_id: int | None) -> str:
    """What the user is told once /reset (``role``) or /forget is carried out: in a forum
    topic, /reset forgets that topic's conversation only, and says so."""
    if role == repository.FORGET_ROLE:
        return texts.FORGET_DONE
    return texts.RESET_DONE if thread_id is None else texts.RESET_TOPIC_DONE


async def carry_out(bot: Bot, dialogue: DialogueService, command: OwedMessage) -> None:
    """Carry out a stored /reset or /forget whose turn has come (the replies before it are
    delivered), then tell the user, in the topic it was sent in. The deletion comes first:
    if telling fails, the history is gone all the same and the user can ask again."""
    check_lease()  # with replicas: only while this replica holds the user's lease
    await dialogue.carry_out(command.user, command.message_id, command.role, command.thread_id)
    await bot.send_message(
        command.user.telegram_id,
        done_text(command.role, command.thread_id),
        message_thread_id=command.thread_id,
    )


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
