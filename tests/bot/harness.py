"""Running the real bot process against the fake Bot API server."""

import asyncio
import signal
import sqlite3
import sys
import time
from pathlib import Path

from tests.bot.fake_telegram import FakeTelegram

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "123456:TEST-token-never-logged"
ALICE, BOB = 1001, 1002


class BotProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, fake: FakeTelegram, wait: bool = True) -> None:
        polls = fake.count("getUpdates")
        handle = self.log.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            cwd=self.log.parent,  # a stray .env in the checkout is not read
            env={**self.env, "PYTHONPATH": str(ROOT)},
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


def stored_messages(db: Path, telegram_id: int) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as connection:
        return connection.execute(
            "SELECT m.role, m.text FROM messages m JOIN users u ON u.id = m.user_id "
            "WHERE u.telegram_id = ? ORDER BY m.id",
            (telegram_id,),
        ).fetchall()
