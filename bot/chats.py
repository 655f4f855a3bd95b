"""Whose memory a Telegram message belongs to, where its reply goes, and who may change it.

Shared by the Telegram adapters (``bot/handlers``) and the layer that owns a message's life
(``bot/conversation.py``), so that neither has to import the other for it.
"""

from __future__ import annotations

import re

from aiogram import Bot
from aiogram.types import Message

from bot.config import Settings
from bot.dialogue import UserRef, clean_user_text

#: What Telegram calls a group's administrators in ``getChatMember``.
GROUP_ADMIN_STATUSES = frozenset({"creator", "administrator"})


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


async def remembered_text(message: Message, bot: Bot) -> str:
    """What of a message goes into memory: in a group without the mention of the bot.

    In a group the bot's own account is already known here (the filter that let the message
    through asked for it, and aiogram keeps it), so this does not wait on the network."""
    text = message.text or ""
    if message.chat.type != "private":
        me = await bot.me()
        text = re.sub(rf"@{re.escape(me.username or '')}\b", " ", text, flags=re.IGNORECASE)
    return clean_user_text(text)


async def may_change_shared_memory(message: Message, bot: Bot, settings: Settings) -> bool:
    """Whether the sender may reset, delete or retune the memory this chat shares: anyone in a
    private chat; in a group (one memory for everyone there, see :func:`user_ref`) the group's
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
