"""Showing a reply while it is being generated, within Telegram's flood limits.

The first words are sent as soon as they exist, and the message is then edited with the reply
so far, at most once per ``interval_s`` per chat, counted from the user's message (Telegram
allows about one message or edit per second per chat, and bots that edit on every token get
"Too Many Requests" bans). So a reply that is ready within ``interval_s`` is sent once, whole,
with no edits at all; a slow one (a long reply, a busy CPU) shows its first words after at most
``interval_s`` and grows from there. Updates that arrive in between are coalesced: only the
newest text is ever sent. :meth:`ReplyStream.finish` puts the
final, cleaned reply in place (the same text the database keeps), splitting it when it is longer
than one Telegram message; it raises when Telegram does not take it, so the caller never stores
a reply the user did not get.

In a private chat the progress goes as a *draft* instead (``sendMessageDraft``, :class:`Drafts`):
an ephemeral preview under the user's input that vanishes unless a message follows, and the reply
is sent once, whole, with ``sendMessage``. A bot killed (or a replica stalled) mid-reply then
leaves nothing on the user's screen, and whoever answers the message next sends it once. Where
drafts are not offered (groups; a Bot API server that does not know the method, or refuses it
for this bot) the reply streams by edits, as above.

Telegram failing for a while (5xx, timeouts past the retries of ``bot.middlewares.retry``):
:meth:`ReplyStream.finish` keeps trying to deliver the final text for ``outage_s``, so the user
is left with the whole reply once Telegram is back, never with its first words as the last
word, and the reply is stored only then.

A group has a second limit: about 20 messages a minute per group, edits included (Telegram's
FAQ, and its maintainers on edits), so one reply streamed at one edit a second used most of a
group's minute, and the next replies met "Too Many Requests" with waits of tens of seconds.
:class:`GroupPace` counts what the bot sent to each group in the last minute; a reply in a group
shows its progress only while a share of that minute is left, and its final text always goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from aiogram import Bot
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramNetworkError,
    TelegramNotFound,
    TelegramServerError,
)
from aiogram.methods import SendMessageDraft
from aiogram.types import Message, ReplyParameters
from aiogram.utils.chat_action import ChatActionSender

from bot.dialogue import TELEGRAM_LIMIT, split_message

logger = logging.getLogger(__name__)

#: Telegram's limit per group chat: "not more than 20 messages per minute", edits included.
GROUP_MESSAGES_PER_MINUTE = 20
#: Of those, what progress edits leave for final texts and notices.
GROUP_RESERVE = 5


class GroupPace:
    """Messages and edits this process sent to each group in the last ``window_s`` seconds.

    Private chats (positive ids) are not counted: one reply at a time and the per-chat interval
    keep them within their limit. Per process: replicas answer a group from one replica at a
    time (its lease), so the count follows the group.
    """

    def __init__(
        self,
        limit: int = GROUP_MESSAGES_PER_MINUTE,
        reserve: int = GROUP_RESERVE,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.progress_limit = max(limit - reserve, 0)  # what progress edits may use
        self.window_s = window_s
        self.clock = clock
        self._sent: dict[int, deque[float]] = {}

    def _recent(self, chat_id: int) -> deque[float]:
        sent = self._sent.get(chat_id)
        if sent is None:
            return deque()
        horizon = self.clock() - self.window_s
        while sent and sent[0] <= horizon:
            sent.popleft()
        if not sent:
            del self._sent[chat_id]
        return sent

    def note(self, chat_id: int) -> None:
        """A message or edit went to ``chat_id``."""
        if chat_id < 0:
            self._recent(chat_id)  # drops what left the window
            self._sent.setdefault(chat_id, deque()).append(self.clock())

    def progress_wait_s(self, chat_id: int) -> float:
        """How long a progress edit to ``chat_id`` must wait for room (0: it may go now)."""
        if chat_id >= 0:
            return 0.0
        sent = self._recent(chat_id)
        if len(sent) < self.progress_limit:
            return 0.0
        if not self.progress_limit:  # no progress edits at all: only final texts
            return self.window_s
        # room once enough of the oldest have left the window
        return sent[len(sent) - self.progress_limit] + self.window_s - self.clock()


#: The process's count of what went to each group (every ReplyStream shares it).
GROUP_PACE = GroupPace()

#: While Telegram fails, how long to wait between tries of a reply's final text.
OUTAGE_RETRY_INTERVAL_S = 2.0


class Drafts:
    """Whether this process streams replies in private chats as drafts (``sendMessageDraft``).

    On unless the operator turned it off (``STREAM_DRAFTS=false``), and off for the rest of the
    process the first time the Bot API answers that it does not know the method (an older local
    Bot API server) or will not take it from this bot: one refusal is enough, so no reply pays
    for a second one. Counted: ``sent`` drafts, and replies that fell back to edits.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.sent = 0

    def refused(self, error: Exception) -> None:
        if self.enabled:
            logger.warning(
                "the Bot API refused sendMessageDraft (%s): replies stream by edits from now on",
                getattr(error, "message", type(error).__name__),
            )
        self.enabled = False


class ReplyStream:
    """One reply being streamed into one Telegram message (then more, if it is long).

    ``resume_message_id``: a message of the bot's that an earlier attempt at this same reply
    was writing into (a bot killed mid-reply, or a replica that died); the reply is written into
    it instead of a second message. ``on_sent`` learns the id of the message the reply goes
    into, as soon as it exists, so that a restart or another replica can do just that.
    ``quote_message_id``: the user's message the reply's first message quotes (a Telegram
    reply to it); sent even if that message was deleted meanwhile. ``quote_when``, if given,
    decides whether to quote at the moment that message is sent, not before the reply is
    generated: whether a bare reply could be taken for an answer to something else depends on
    what the user wrote meanwhile. ``pace``: the groups' minute budget (:data:`GROUP_PACE`).
    ``drafts`` and ``draft_id`` (non-zero, the same for every try at this reply): stream the
    progress as a draft where :class:`Drafts` allows (a private chat, nothing to resume).
    ``outage_s``: how long :meth:`finish` keeps trying the final text while Telegram fails.
    ``noted_message``: asked once, before the reply's first message is sent, for a message
    noted for this reply meanwhile (a replica that lost the lease while its message was on the
    way): the reply then goes into it rather than beside it.
    """

    def __init__(
        self,
        bot: Bot,
        chat_id: int,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        thread_id: int | None = None,
        resume_message_id: int | None = None,
        on_sent: Callable[[int], Awaitable[None]] | None = None,
        quote_message_id: int | None = None,
        quote_when: Callable[[], Awaitable[bool]] | None = None,
        pace: GroupPace | None = None,
        drafts: Drafts | None = None,
        draft_id: int = 0,
        outage_s: float = 0.0,
        noted_message: Callable[[], Awaitable[int | None]] | None = None,
    ) -> None:
        self.bot = bot
        self.chat_id = chat_id  # the reply goes to this chat (and forum topic, if any)
        self.thread_id = thread_id
        self.interval_s = interval_s
        self.clock = clock
        self.sent: int | None = resume_message_id  # the message the reply is written into
        self._on_sent = on_sent
        self._quote = (
            ReplyParameters(message_id=quote_message_id, allow_sending_without_reply=True)
            if quote_message_id is not None
            else None
        )
        self._quote_when = quote_when
        self.pace = pace if pace is not None else GROUP_PACE
        drafting = drafts is not None and chat_id > 0 and draft_id and resume_message_id is None
        self._drafts = drafts if drafting else None
        self._draft_id = draft_id
        self.outage_s = outage_s
        self._more_sent = 0  # pieces after the first that reached the user (a long final text)
        self._noted_message = noted_message
        self._latest = ""
        self._shown = ""
        self._last_send = clock()  # the user's message counts as the chat's last exchange
        self._pump: asyncio.Task[None] | None = None
        self._sending = False
        self._finished = False
        # The reply's own context (with replicas, the user's lease that check_lease reads):
        # ``update`` may be called from wherever the engine reports text, and the messages it
        # leads to are sent on the reply's behalf.
        self._context = contextvars.copy_context()

    def update(self, text: str) -> None:
        """The reply so far (called on the event loop by the engine): shown soon, not at once."""
        self._latest = text[:TELEGRAM_LIMIT]
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run(), context=self._context.copy())

    async def _run(self) -> None:
        while not self._finished and self._latest and self._latest != self._shown:
            wait = max(
                self._last_send + self.interval_s - self.clock(),
                self.pace.progress_wait_s(self.chat_id),
            )
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # the reply may have grown or finished meanwhile
            self._sending = True
            try:
                await self._show(self._latest)
            except TelegramBadRequest as error:  # finish() sends the final text once more
                logger.debug("stream update refused: %s", error.message)
                return  # the next update starts the pump again; never the same text in a loop
            except Exception as error:
                # Telegram down past the retries, or (replicas) the lease ran out: finish()
                # tries the final text and raises if that fails too. Ending here, rather than
                # with the exception, keeps asyncio's "never retrieved" traceback out of the log.
                logger.warning("stream update not shown: %s", type(error).__name__)
                return
            finally:
                self._sending = False

    async def _show(self, text: str, final: bool = False) -> None:
        """Put ``text`` on the user's screen (as a draft while it is not ``final``, where
        drafts are used). It counts as shown only once Telegram took it: recorded before, an
        edit that failed (a 502 past the retries) made :meth:`finish` skip the final edit, and
        a reply the user saw cut was stored as delivered."""
        self._last_send = self.clock()
        drafts = self._drafts
        if drafts is not None and drafts.enabled and self.sent is None and not final:
            try:
                await self.bot(
                    SendMessageDraft(
                        chat_id=self.chat_id,
                        draft_id=self._draft_id,
                        text=text,
                        message_thread_id=self.thread_id,
                    )
                )
                drafts.sent += 1
                self._shown = text
                return
            except (TelegramNotFound, TelegramBadRequest) as error:
                drafts.refused(error)  # and this reply streams by edits, from this text on
        if self.sent is None and self._noted_message is not None:
            ask, self._noted_message = self._noted_message, None
            try:
                self.sent = await ask()
            except Exception as error:  # a new message, as without the question
                logger.debug("could not ask for a noted message: %s", type(error).__name__)
        if self.sent is not None:
            self.pace.note(self.chat_id)
            try:
                await self.bot.edit_message_text(
                    text=text, chat_id=self.chat_id, message_id=self.sent
                )
                self._shown = text
                return
            except TelegramBadRequest as error:
                if "not modified" in error.message:  # the same text again: nothing to lose
                    logger.debug("stream edit skipped: %s", error.message)
                    self._shown = text
                    return
                # The message is gone (deleted by the user, or a draft too old to edit): the
                # reply goes into a new one, so the user never misses it.
                logger.info("cannot edit the reply's message (%s): sending anew", error.message)
        self.sent = (await self._send(text, await self._quote_now())).message_id
        self._shown = text
        if self._on_sent is not None:
            try:
                await self._on_sent(self.sent)
            except Exception as error:
                # Only a crash from here on would need it; failing the reply the user is
                # already reading (and answering it again later) would be worse.
                logger.warning("the reply's message id was not kept: %s", type(error).__name__)

    async def _quote_now(self) -> ReplyParameters | None:
        """The quote for a message sent now (see ``quote_when``); when asking fails (the
        database down), the quote goes with it: a needless quote is harmless."""
        if self._quote is None or self._quote_when is None:
            return self._quote
        try:
            return self._quote if await self._quote_when() else None
        except Exception as error:
            logger.debug("quoting anyway, the check failed: %s", type(error).__name__)
            return self._quote

    async def finish(self, final: str) -> None:
        """Replace the streamed text with ``final`` (and send what does not fit as more messages).

        Waits for an edit in flight and keeps the per-chat interval for the last edit too.
        """
        self._finished = True
        if self._pump is not None and not self._pump.done():
            if self._sending:  # let the request in flight land, so edits never overlap
                with contextlib.suppress(Exception):
                    await self._pump
            else:  # only waiting out the interval: the final text supersedes it
                self._pump.cancel()
                # asyncio.wait, not ``suppress(CancelledError)`` around ``await``: that would
                # also swallow a cancellation of this reply itself (a shutdown) arriving while
                # the update ends, and the reply would go on being sent.
                await asyncio.wait([self._pump])
        pieces = split_message(final) or [final]
        gives_up_at = time.monotonic() + self.outage_s
        while True:
            try:
                await self._deliver(pieces)
                return
            except (TelegramNetworkError, TelegramServerError) as error:
                if time.monotonic() >= gives_up_at:
                    raise
                logger.warning(
                    "chat %s: Telegram did not take the reply's final text (%s): trying again",
                    self.chat_id,
                    type(error).__name__,
                )
                await asyncio.sleep(OUTAGE_RETRY_INTERVAL_S)

    async def _deliver(self, pieces: list[str]) -> None:
        """The final text, from where an earlier try stopped: the first piece in the reply's
        message (sent now when there is none yet: a draft, or nothing shown), the rest as
        more messages."""
        if self.sent is None:
            await self._show(pieces[0], final=True)
        elif pieces[0] != self._shown:
            wait = self._last_send + self.interval_s - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._show(pieces[0], final=True)
        for piece in pieces[1 + self._more_sent :]:
            await self._send(piece)
            self._more_sent += 1

    async def _send(self, text: str, quote: ReplyParameters | None = None) -> Message:
        self.pace.note(self.chat_id)
        return await self.bot.send_message(
            chat_id=self.chat_id,
            text=text,
            message_thread_id=self.thread_id,
            reply_parameters=quote,
        )


class TypingIndicator(ChatActionSender):
    """aiogram's "typing…" sender, ending quietly when Telegram refuses it.

    The indicator is a courtesy, not worth a retry (bot.middlewares.retry skips it). When a
    call fails (a user who blocked the bot, a Bot API server without sendChatAction, a network
    error), aiogram's worker task ends with the exception and nothing awaits it: asyncio then
    logged "Task exception was never retrieved" with a traceback at ERROR, once per reply.
    """

    async def _worker(self) -> None:
        try:
            await super()._worker()
        except Exception as error:
            logger.debug("typing indicator stopped: %s", type(error).__name__)
