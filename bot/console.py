"""`python -m bot chat`: talk to the model in a terminal, through the very same services.

History lives in the same database as the Telegram users', under the local user
``CONSOLE_USER_ID`` (0 by default, never a real Telegram id), so a second session remembers the
first one.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import TextIO

from bot import texts
from bot.config import Settings
from bot.dialogue import DialogueService, UserRef, clean_user_text
from bot.engine import EngineBusy, EngineTimeout
from bot.facts import describe_memory

PROMPT = "вы> "
HINT = "Консольный чат. Команды: /reset, /temp [значение], /memory, /help, /exit (или Ctrl-D)."


class ConsoleStream:
    """Prints a reply as it is generated: the same growing text the Telegram edits show."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.shown = ""

    def update(self, text: str) -> None:
        if text.startswith(self.shown) and text != self.shown:
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text

    def finish(self, text: str) -> None:
        """The final text: the rest of it, or all of it again if it differs from what streamed
        (the busy or timeout text replaces a partial reply, as in Telegram)."""
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown) :])
        else:
            self.out.write("\n" + text)
        self.out.write("\n")
        self.out.flush()


async def _handle(
    line: str,
    user: UserRef,
    dialogue: DialogueService,
    settings: Settings,
    on_text: Callable[[str], None] | None = None,
) -> str:
    if line == "/help":
        return texts.HELP.format(low=settings.temperature_min, high=settings.temperature_max)
    if line == "/reset":
        await dialogue.reset(user)
        return texts.RESET_DONE
    if line == "/memory":
        return describe_memory(*await dialogue.memory(user))
    if line == "/temp" or line.startswith("/temp "):
        return await dialogue.temperature_command(user, line[len("/temp") :])
    text = clean_user_text(line)
    if not text:
        return texts.NOT_TEXT
    message_id = await dialogue.remember_user_message(user, text)
    assert message_id is not None  # only a Telegram message can be delivered twice
    try:
        reply = await dialogue.make_reply(user, message_id, on_text=on_text)
    except EngineBusy:
        return texts.BUSY
    except EngineTimeout:
        return texts.TIMEOUT
    await dialogue.store_reply(user, reply, message_id)
    return reply


async def run_console(settings: Settings) -> None:
    from bot.app import open_services

    db_engine, dialogue = await open_services(settings)
    user = UserRef(settings.console_user_id, "console")
    print(HINT, flush=True)
    try:
        while True:
            try:
                line = (await asyncio.to_thread(input, PROMPT)).strip()
            except EOFError:
                print()
                break
            if line in ("/exit", "/quit"):
                break
            if line:
                print("бот> ", end="", flush=True)
                stream = ConsoleStream(sys.stdout)
                on_text = stream.update if settings.stream_replies else None
                stream.finish(await _handle(line, user, dialogue, settings, on_text))
    finally:
        await dialogue.backend.aclose()
        await db_engine.dispose()
    sys.stdout.flush()
