"""Running the real bot process against the fake Bot API server."""

import asyncio
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.bot.fake_telegram import FakeTelegram
from tests.bot.forkserver import ForkedBot

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "123456:TEST-token-never-logged"
ALICE, BOB = 1001, 1002


def run_python(
    *args: str, cwd: Path, env: dict[str, str], input_: str | None = None
) -> subprocess.CompletedProcess[str]:
    """This interpreter run to the end with ``args`` (``-m bot chat``, ``-c <script>``), its
    output captured as text; five minutes at most (a busy CI machine loading a model)."""
    return subprocess.run(
        [sys.executable, *args],
        input=input_,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


class BotProcess:
    """The real bot in a process of its own. ``fork=True`` (the default): forked from the
    tests' fork server, which has the bot's imports done (``tests.bot.forkserver``: about 16 s
    of CPU less per start); ``False``: ``python -m bot`` exactly as an operator runs it."""

    def __init__(self, env: dict[str, str], log: Path, fork: bool = True) -> None:
        self.env, self.log, self.fork = env, log, fork
        self.process: asyncio.subprocess.Process | ForkedBot | None = None

    async def start(self, fake: FakeTelegram, wait: bool = True) -> None:
        polls = fake.count("getUpdates")
        env = {**self.env, "PYTHONPATH": str(ROOT)}
        cwd = self.log.parent  # a stray .env in the checkout is not read
        if self.fork:
            self.process = await ForkedBot.start(env, cwd, self.log, [])
        else:
            handle = self.log.open("ab")
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot",
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=handle,
                stderr=handle,
            )
        if wait:
            await fake.wait_for(lambda: fake.count("getUpdates") > polls, timeout=90)

    async def stop(self) -> float:
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 30)
        assert code == 0, self.log.read_text(errors="replace")[-3000:]
        return time.monotonic() - started

    def kill(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.kill()


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait until ``predicate()`` holds (the very state a test asserts next), or fail saying
    ``what`` was awaited. Tests wait for state, never for an earlier event plus a sleep."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def bot_replies(db: Path, telegram_id: int) -> list[str]:
    """The replies stored for the chat: each was delivered whole before it was stored."""
    return [text for role, text in stored_messages(db, telegram_id) if role == "bot"]


def stored_messages(db: Path, telegram_id: int) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as connection:
        return connection.execute(
            "SELECT m.role, m.text FROM messages m JOIN users u ON u.id = m.user_id "
            "WHERE u.telegram_id = ? ORDER BY m.id",
            (telegram_id,),
        ).fetchall()


def answered(db: Path, telegram_id: int) -> list[tuple[str, str | None]]:
    """(user message, the stored reply that answers it, or None), in the order they were sent."""
    with sqlite3.connect(db) as connection:
        return connection.execute(
            "SELECT m.text, r.text FROM messages m JOIN users u ON u.id = m.user_id "
            "LEFT JOIN messages r ON r.reply_to_id = m.id "
            "WHERE u.telegram_id = ? AND m.role = 'user' ORDER BY m.id",
            (telegram_id,),
        ).fetchall()
