"""The fake Bot API server as a container of the compose end-to-end run, driving the test.

Runs inside the deployment's own network (compose.e2e.yaml): waits until every bot replica has
registered its webhook and the proxy answers, then three users write five messages each, pushed
through the proxy as Telegram pushes them, and it checks what a user would: every message answered
exactly once, in order, the chat showing exactly the stored replies. Exit status 0 on success.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import aiohttp
import asyncpg

from tests.bot.fake_telegram import FakeTelegram

USERS = [3001, 3002, 3003]
MESSAGES = 5
PROXY = "http://proxy"


async def wait(predicate, what: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)


async def proxy_up() -> bool:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{PROXY}/healthz", timeout=aiohttp.ClientTimeout(total=3)) as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def conversation(database: str) -> list[tuple[int, str, list[str]]]:
    connection = await asyncpg.connect(database)
    try:
        rows = await connection.fetch(
            "SELECT u.telegram_id, m.text, ARRAY(SELECT r.text FROM messages r "
            "WHERE r.reply_to_id = m.id ORDER BY r.id) AS replies "
            "FROM messages m JOIN users u ON u.id = m.user_id WHERE m.role = 'user' ORDER BY m.id"
        )
    finally:
        await connection.close()
    return [(r["telegram_id"], r["text"], list(r["replies"])) for r in rows]


async def main() -> int:
    fake = FakeTelegram(os.environ["TELEGRAM_BOT_TOKEN"])
    await fake.start(host="0.0.0.0", port=8081)
    replicas = int(os.environ.get("REPLICAS", "2"))
    database = os.environ["DATABASE_URL"]
    started = time.monotonic()

    async def registered() -> bool:
        return fake.count("setWebhook") >= replicas

    await wait(registered, f"{replicas} replicas to register the webhook", 600)
    await wait(proxy_up, "the proxy", 120)
    fake.deliver_to(f"{PROXY}/webhook", os.environ["WEBHOOK_SECRET"], own_network=True)
    for k in range(MESSAGES):
        for user in USERS:
            fake.send_text(user, f"Пользователь {user}, сообщение {k}")

    async def all_answered() -> bool:
        rows = await conversation(database)
        return sum(len(replies) for *_, replies in rows) >= len(USERS) * MESSAGES

    await wait(all_answered, "every reply", 600)
    rows = await conversation(database)
    failures = []
    for user in USERS:
        mine = [(text, replies) for who, text, replies in rows if who == user]
        if [t for t, _ in mine] != [f"Пользователь {user}, сообщение {k}" for k in range(MESSAGES)]:
            failures.append(f"user {user}: messages stored out of order or twice: {mine}")
        if [len(r) for _, r in mine] != [1] * MESSAGES:
            failures.append(f"user {user}: not answered exactly once: {mine}")
        if fake.sent_to(user) != [r[0] for _, r in mine if r]:
            failures.append(f"user {user}: chat shows {fake.sent_to(user)}")
    print(
        json.dumps(
            {
                "users": len(USERS),
                "messages": len(USERS) * MESSAGES,
                "replies_stored": sum(len(r) for *_, r in rows),
                "webhook_posts": fake.webhook_attempts,
                "seconds_from_start": round(time.monotonic() - started, 1),
                "failures": failures,
            },
            ensure_ascii=False,
        ),
        flush=True,
    )
    await fake.stop()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
