"""Which Bot API calls are sent again after Telegram fails, and which are left to the next one."""

from __future__ import annotations

from typing import Any

import pytest
from aiogram import Bot
from aiogram.exceptions import TelegramServerError
from aiogram.methods import SendMessage, SendMessageDraft, TelegramMethod

from bot.middlewares.retry import RetryMiddleware
from tests.bot.recording_session import RecordingSession


class FailingTelegram:
    """``make_request`` for the middleware: Telegram answering 502 the first ``failures``
    times, then accepting; counts the tries."""

    def __init__(self, failures: int) -> None:
        self.failures, self.tries = failures, 0

    async def __call__(self, bot: Bot, method: TelegramMethod[Any]) -> Any:
        self.tries += 1
        if self.tries <= self.failures:
            raise TelegramServerError(method, "Bad Gateway")
        return True


@pytest.fixture
def bot() -> Bot:
    return Bot("42:TEST", session=RecordingSession())


async def test_a_reply_message_is_sent_again_after_telegram_failed(bot):
    telegram = FailingTelegram(failures=2)
    retry = RetryMiddleware(base_delay_s=0.0)
    assert await retry(telegram, bot, SendMessage(chat_id=1, text="ответ")) is True
    assert telegram.tries == 3


async def test_a_draft_is_tried_once_the_next_update_replaces_it(bot):
    """A preview is not worth the backoff: the stream's next update (or the final message)
    carries more text than the draft that failed."""
    telegram = FailingTelegram(failures=1)
    retry = RetryMiddleware(base_delay_s=0.0)
    with pytest.raises(TelegramServerError):
        await retry(telegram, bot, SendMessageDraft(chat_id=1, draft_id=7, text="отв"))
    assert telegram.tries == 1
