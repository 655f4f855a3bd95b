"""An aiogram session that records what the bot sends instead of calling Telegram.

The pattern of aiogram's own ``tests/mocked_bot.py``: handlers, filters, middlewares and
injection all run for real (``dp.feed_raw_update``); only the HTTP call is replaced.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from aiogram import Bot
from aiogram.client.session.base import BaseSession
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramNotFound,
    TelegramServerError,
)
from aiogram.methods import (
    EditMessageText,
    GetChatMember,
    GetMe,
    SendMessage,
    SendMessageDraft,
    TelegramMethod,
)
from aiogram.types import Chat, ChatMemberMember, ChatMemberOwner, Message, User

BOT_USER = User(id=42, is_bot=True, first_name="Тестбот", username="test_bot")


class RecordingSession(BaseSession):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[TelegramMethod[Any]] = []
        self.times: list[float] = []  # time.monotonic() of each request
        self.gone: set[int] = set()  # message ids whose edits Telegram refuses (deleted)
        self.blocked: set[int] = set()  # chats that refuse the bot (blocked, left the group)
        self.group_admins: set[tuple[int, int]] = set()  # (group, user) for getChatMember
        self.failing_edits = 0  # the next this many edits fail as Telegram's 502 would
        self.failing_sends = 0  # the next this many sendMessage calls fail likewise
        self.drafts_offered = False  # sendMessageDraft: unknown, as to a Bot API before 9.3

    async def make_request(
        self, bot: Bot, method: TelegramMethod[Any], timeout: int | None = None
    ) -> Any:
        self.requests.append(method)
        self.times.append(time.monotonic())
        chat_id = getattr(method, "chat_id", None)
        if chat_id is not None and int(chat_id) in self.blocked:
            raise TelegramForbiddenError(method, "Forbidden: bot was blocked by the user")
        if isinstance(method, EditMessageText) and method.message_id in self.gone:
            raise TelegramBadRequest(method, "Bad Request: message to edit not found")
        if isinstance(method, EditMessageText) and self.failing_edits > 0:
            self.failing_edits -= 1
            raise TelegramServerError(method, "Bad Gateway")
        if isinstance(method, SendMessage) and self.failing_sends > 0:
            self.failing_sends -= 1
            raise TelegramServerError(method, "Bad Gateway")
        if isinstance(method, SendMessageDraft) and not self.drafts_offered:
            raise TelegramNotFound(method, "Not Found")
        if isinstance(method, GetMe):
            return BOT_USER
        if isinstance(method, GetChatMember):
            user = User(id=method.user_id, is_bot=False, first_name=f"user{method.user_id}")
            if (int(method.chat_id), method.user_id) in self.group_admins:
                return ChatMemberOwner(user=user, is_anonymous=False)
            return ChatMemberMember(user=user)
        if isinstance(method, SendMessage):
            return Message(
                message_id=len(self.requests),
                date=int(time.time()),
                chat=Chat(id=int(method.chat_id), type="private"),
                from_user=BOT_USER,
                text=method.text,
            )
        return True

    async def stream_content(
        self,
        url: str,
        headers: dict[str, Any] | None = None,
        timeout: int = 30,
        chunk_size: int = 65536,
        raise_for_status: bool = True,
    ) -> AsyncGenerator[bytes, None]:
        yield b""

    async def close(self) -> None:
        pass

    def texts_to(self, chat_id: int) -> list[str]:
        return [
            m.text
            for m in self.requests
            if isinstance(m, SendMessage) and int(m.chat_id) == chat_id
        ]


def text_update(update_id: int, user_id: int, text: str) -> dict[str, Any]:
    entities = (
        [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        if text.startswith("/")
        else []
    )
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": int(time.time()),
            "chat": {"id": user_id, "type": "private"},
            "from": {"id": user_id, "is_bot": False, "first_name": "Тест"},
            "text": text,
            "entities": entities,
        },
    }


async def in_process_bot(db_url: str, model_dir: Path, reply_tokens: int = 8, **settings: Any):
    """The real dispatcher, services, database and model, with only HTTP recorded.

    Returns (dispatcher, bot, recording session, database engine); the caller closes the
    generation engine (``dp["dialogue"].backend.close()``) and disposes the database.
    """
    from bot.app import build_dispatcher
    from bot.config import Settings
    from bot.db.engine import create_engine, create_sessionmaker, upgrade_to_head
    from bot.dialogue import DialogueService
    from bot.engine import GenerationEngine, load_model

    await upgrade_to_head(db_url)
    db = create_engine(db_url)
    model, tokenizer = load_model(str(model_dir))
    engine = GenerationEngine(model, tokenizer, persona=None, reply_tokens=reply_tokens)
    engine.start()
    config = Settings(_env_file=None, database_url=db_url, model_path=str(model_dir), **settings)
    dialogue = DialogueService(create_sessionmaker(db), engine, config)
    session = RecordingSession()
    return build_dispatcher(dialogue, config, db), Bot("42:TEST", session=session), session, db
