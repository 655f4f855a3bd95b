"""Text messages: remember, generate (typing shown meanwhile), answer, remember the answer."""

from __future__ import annotations

import functools
import logging
import re
import time
from datetime import datetime
from typing import TYPE_CHECKING

from aiogram import Bot, F, Router
from aiogram.exceptions import TelegramForbiddenError
from aiogram.filters import BaseFilter
from aiogram.types import Message

from bot import texts
from bot.config import Settings
from bot.dialogue import DialogueService, OwedMessage, Turn, clean_user_text
from bot.engine import EngineBusy, EngineTimeout
from bot.handlers.commands import topic_of, user_ref
from bot.metrics import BotMetrics
from bot.replicas import check_lease
from bot.streaming import ReplyStream, TypingIndicator

if TYPE_CHECKING:
    from bot.pending import OwedReplies

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


def held_too_long(message: Message, online_since: datetime, max_age_s: float) -> bool:
    """Whether Telegram held ``message`` while the bot was down, for longer than
    PENDING_REPLY_MAX_AGE_S: sent before this process started and older than that now.

    Telegram keeps a stopped bot's updates for a day and hands them all over at the next start.
    Answered like new ones they flood the queue with replies hours late (new users meanwhile
    told the bot is busy) and, in groups, bury the conversation under answers to what nobody
    remembers asking. They get what a message left unanswered by a crash gets (bot.pending):
    answered while recent, otherwise kept in the history unanswered. A message sent since the
    start is live, however long it waits.
    """
    sent = message.date  # whole seconds, so the start is compared in whole seconds too
    if sent >= online_since.replace(microsecond=0):
        return False
    return (datetime.now(sent.tzinfo) - sent).total_seconds() > max_age_s


async def chat(
    message: Message,
    bot: Bot,
    dialogue: DialogueService,
    metrics: BotMetrics,
    settings: Settings,
    online_since: datetime,
    owed: OwedReplies | None = None,
) -> None:
    """Store the message, then answer it: here, or (with replicas, ``owed`` set) by whichever
    replica holds the user's lease, after the update has been acknowledged (bot.replicas).
    A message held by Telegram while the bot was down is only stored once it is too old
    (:func:`held_too_long`)."""
    user = user_ref(message)
    turn = dialogue.take_turn(user)  # first, before any await: fixes this message's place
    try:
        text = await _remembered_text(message, bot)
        if not text:  # only the bot's name ("@bot" to call it), or nothing a model can read
            await message.answer(texts.LISTENING)
            return
        thread_id = topic_of(message)
        await turn.wait_to_store()
        message_id = await dialogue.remember_user_message(user, text, message.message_id, thread_id)
        turn.mark_stored()
        if message_id is None:  # the same update again: answered once already, or pending
            return
        if held_too_long(message, online_since, settings.pending_reply_max_age_s):
            await dialogue.settle(message_id)
            logger.info(
                "chat %s: message %d was sent %s, while the bot was down: kept in the history, "
                "not answered (older than PENDING_REPLY_MAX_AGE_S)",
                user.telegram_id,
                message.message_id,
                message.date.isoformat(timespec="seconds"),
            )
            return
        if owed is not None:
            owed.answer_soon(user, from_id=message_id)
            return
        stored = OwedMessage.just_stored(user, message_id, message.message_id, thread_id)
        await answer(bot, dialogue, metrics, settings, turn, stored)
    finally:
        turn.finish()


async def _remembered_text(message: Message, bot: Bot) -> str:
    """What of a message goes into memory: in a group without the mention of the bot."""
    text = message.text or ""
    if message.chat.type != "private":
        me = await bot.me()
        text = re.sub(rf"@{re.escape(me.username or '')}\b", " ", text, flags=re.IGNORECASE)
    return clean_user_text(text)


async def edited(message: Message, bot: Bot, dialogue: DialogueService) -> None:
    """A user edited a message: if the bot stored it, its memory takes the new text. Nothing
    is sent (the reply already given stays); an edit of a message the bot never stored (in a
    group, one not addressed to it) changes nothing."""
    text = await _remembered_text(message, bot)
    if text and await dialogue.edit_user_message(user_ref(message), message.message_id, text):
        logger.info("chat %s: message %d edited", message.chat.id, message.message_id)


async def answer(
    bot: Bot,
    dialogue: DialogueService,
    metrics: BotMetrics,
    settings: Settings,
    turn: Turn,
    message: OwedMessage,
) -> None:
    """Answer the stored user ``message`` in the user's chat, in turn: a reply delivered and
    stored, or the message settled (``DialogueService.settle``) when the user got a notice
    instead (busy, too slow) or the chat takes no messages from the bot (blocked, left it).

    The one path for a new message and for one left unanswered by a crash (bot.pending). The
    reply is stored only after Telegram took all of it: a reply that never reached the user
    leaves the message unanswered, to be answered at the next start. The chat is
    ``user.telegram_id``: a memory is a private chat's user or a group (see ``user_ref``), and
    a private chat's id is its user's id. ``message.draft_id``: the bot's message an earlier
    attempt (killed, or a replica that died) was streaming this reply into; the reply is
    finished there. The message this attempt writes into is stored with the user's message as
    soon as it exists.

    The reply quotes the message it answers where a bare reply could be taken for an answer to
    something else: in a group (several people talk to the bot), and when the user has written
    again since (messages sent in a burst, a reply owed from before a restart), as it stands
    when the reply's message is sent (a message written while the reply was generated counts).
    """
    await turn.wait_to_answer()
    started = time.perf_counter()
    user, message_id = message.user, message.message_id
    if message.draft_id is not None:
        logger.info(
            "message %d: an earlier attempt died mid-reply; replying in its place", message_id
        )

    async def quote_needed() -> bool:
        return user.telegram_id < 0 or await dialogue.wrote_after(message_id)

    stream = ReplyStream(
        bot,
        user.telegram_id,
        settings.stream_edit_interval_s,
        thread_id=message.thread_id,
        resume_message_id=message.draft_id,
        on_sent=functools.partial(dialogue.remember_draft, message_id),
        quote_message_id=message.telegram_message_id,
        quote_when=quote_needed,
    )
    on_text = stream.update if settings.stream_replies else None
    try:
        try:
            async with TypingIndicator.typing(
                bot=bot, chat_id=user.telegram_id, message_thread_id=message.thread_id
            ):
                reply = await dialogue.make_reply(
                    user, message_id, on_text=on_text, thread_id=message.thread_id
                )
        except (EngineBusy, EngineTimeout) as refusal:
            metrics.busy.inc()
            # replaces whatever was streamed
            await stream.finish(texts.BUSY if isinstance(refusal, EngineBusy) else texts.TIMEOUT)
            await dialogue.settle(message_id)  # the user was told to try again: no late answer
            return
        metrics.generation_seconds.observe(time.perf_counter() - started)
        await stream.finish(reply)  # the final text is the one stored next
    except TelegramForbiddenError as error:
        # Blocked by the user, or no longer in the group: no answer can reach this chat, so it
        # is not tried again (a replica's sweep used to generate the reply anew every few
        # seconds for as long as the message was young enough, a single bot at every start).
        logger.warning(
            "chat %s: the bot may not write there (%s); reply dropped",
            user.telegram_id,
            error.message,
        )
        await dialogue.settle(message_id)
        return
    check_lease()  # with replicas: not if another replica has taken over this user meanwhile
    if not await dialogue.store_reply(user, reply, message_id):
        # This replica stalled past its lease after the check above: another one answered.
        logger.warning(
            "message %d was answered meanwhile by another replica: this reply is not stored",
            message_id,
        )
        return
    metrics.replies.inc()


def make_router() -> Router:
    router = Router(name="chat")
    router.message.register(chat, F.text, AddressedToBot())
    router.edited_message.register(edited, F.text)
    return router
