"""A deployment of real bot processes in webhook mode behind a round-robin proxy, sharing
PostgreSQL and Redis (real servers), with the fake Telegram delivering updates through the proxy:
what the replica tests and the fault runs (``make test-chaos``) start and inspect."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import asyncpg

from tests.bot.fake_telegram import FakeTelegram
from tests.bot.harness import BotProcess
from tests.bot.round_robin import RoundRobinProxy
from tests.servers import free_port

SECRET = "replica-Secret"


def text_of(user: int, k: int) -> str:
    return f"Пользователь {user} пишет сообщение {k:02d}"


async def _healthy(port: int) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/healthz") as response,
        ):
            return response.status == 200
    except aiohttp.ClientError:
        return False


class Deployment:
    """Replicas + proxy + the fake Telegram pushing updates through the proxy."""

    def __init__(self, fake: FakeTelegram, env: dict[str, str], tmp_path: Path) -> None:
        self.fake, self.env, self.tmp_path = fake, env, tmp_path
        self.replicas: list[BotProcess] = []
        self.ports: list[int] = []
        self.proxy: RoundRobinProxy | None = None

    async def start(self, count: int) -> None:
        for index in range(count):
            port = free_port()
            env = {**self.env, "LISTEN_PORT": str(port)}
            replica = BotProcess(env, self.tmp_path / f"replica-{index}.log")
            await replica.start(self.fake, wait=False)
            self.replicas.append(replica)
            self.ports.append(port)
        self.proxy = RoundRobinProxy([f"http://127.0.0.1:{port}" for port in self.ports])
        await self.proxy.start()
        for port in self.ports:
            healthy = False
            for _ in range(1800):  # model loading on a busy machine: up to 3 minutes
                if await _healthy(port):
                    healthy = True
                    break
                await asyncio.sleep(0.1)
            assert healthy, self.logs()[-3000:]
        self.fake.deliver_to(self.proxy.url + "/webhook", SECRET)

    def logs(self) -> str:
        return "".join(r.log.read_text(errors="replace") for r in self.replicas if r.log.exists())

    async def stop(self) -> None:
        for replica in self.replicas:
            if replica.process is not None and replica.process.returncode is None:
                await replica.stop()


def replica_env(bot_env: dict[str, str], database_url: str, redis_url: str) -> dict[str, str]:
    """The settings of a replica: webhook mode, the shared servers, short leases and sweeps
    (a dead replica's users are answered within seconds), short replies."""
    return {
        **bot_env,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "WEBHOOK_URL": "https://bot.example/webhook",  # what setWebhook is told; never called
        "WEBHOOK_SECRET": SECRET,
        "REPLY_TOKENS": "12",
        "STREAM_EDIT_INTERVAL_S": "0",
        "REPLICA_LEASE_S": "2",
        "REPLICA_SWEEP_INTERVAL_S": "0.5",
    }


async def conversation(database: str) -> list[tuple[int, str, int, list[str]]]:
    """(user, message text, message id, the stored replies to it) in stored order."""
    connection = await asyncpg.connect(database)
    try:
        rows = await connection.fetch(
            "SELECT u.telegram_id, m.id, m.text, "
            "ARRAY(SELECT r.text FROM messages r WHERE r.reply_to_id = m.id ORDER BY r.id) "
            "AS replies FROM messages m JOIN users u ON u.id = m.user_id "
            "WHERE m.role = 'user' ORDER BY m.id"
        )
    finally:
        await connection.close()
    return [(r["telegram_id"], r["text"], r["id"], list(r["replies"])) for r in rows]


def visible_messages(fake: FakeTelegram, chat_id: int) -> list[tuple[int, float, str]]:
    """(message id, when it was sent, its text now) of the bot's messages in the chat."""
    return [
        (c.params["message_id"], c.at, fake.shown[c.params["message_id"]])
        for c in fake.calls
        if c.method == "sendMessage" and c.ok and int(c.params["chat_id"]) == chat_id
    ]
