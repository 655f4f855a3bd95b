"""Two real bot processes in webhook mode behind a round-robin proxy, sharing PostgreSQL and
Redis (real servers): every message answered exactly once, in order, each reply generated from
exactly the history before it; and the same when one replica is killed with ``kill -9``."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import aiohttp
import asyncpg
import pytest

from tests.bot.deployment import (
    Deployment,
    conversation,
    replica_env,
    text_of,
    visible_messages,
)
from tests.bot.fake_telegram import FakeTelegram
from tests.bot.harness import BotProcess, eventually

USERS = [2001, 2002, 2003, 2004, 2005]
MESSAGES = 10


@pytest.fixture
async def deployment(fake, bot_env, tmp_path, redis_url, postgres_url):
    env = replica_env(bot_env, postgres_url, redis_url)
    deployment = Deployment(fake, env, tmp_path)
    deployment.database = postgres_url.replace("+asyncpg", "")  # type: ignore[attr-defined]
    try:
        yield deployment
        await deployment.stop()  # SIGTERM: each surviving replica shuts down cleanly
    finally:
        for replica in deployment.replicas:
            replica.kill()
        if deployment.proxy is not None:
            await deployment.proxy.stop()


async def replies_stored(database: str) -> int:
    return sum(len(replies) for *_, replies in await conversation(database))


def send_all(fake: FakeTelegram) -> None:
    """Every user writes ten messages in a row, without waiting for answers."""
    for k in range(MESSAGES):
        for user in USERS:
            fake.send_text(user, text_of(user, k))


async def wait_answered(deployment: Deployment, database: str, timeout: float = 180) -> None:
    total = len(USERS) * MESSAGES
    deadline = asyncio.get_running_loop().time() + timeout
    while await replies_stored(database) < total:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"{await replies_stored(database)} of {total} replies; logs:\n"
                + deployment.logs()[-4000:]
                + await task_dumps(deployment)
            )
        await asyncio.sleep(0.2)


async def task_dumps(deployment: Deployment) -> str:
    """Where each live replica's tasks wait (``kill -USR1``, bot.diagnostics), for a failure
    message: a reply that never came, with nothing logged, was seen once here (a replica held
    one user's lease for minutes after the model had finished the reply), and the log alone
    could not say where it waited."""
    marker = "where each task waits (SIGUSR1)"
    live = [r for r in deployment.replicas if r.process and r.process.returncode is None]
    before = [r.log.read_text(errors="replace").count(marker) for r in live]
    for replica in live:
        replica.process.send_signal(signal.SIGUSR1)
    dumps = []
    for replica, seen in zip(live, before, strict=True):
        try:
            await eventually(
                lambda r=replica, n=seen: r.log.read_text(errors="replace").count(marker) > n,
                f"{replica.log.name}'s task dump",
                timeout=10,
            )
        except AssertionError as error:
            dumps.append(f"\n{error}")
            continue
        dump = replica.log.read_text(errors="replace").rsplit(marker, 1)[1]
        dumps.append(f"\n--- {replica.log.name}: {marker}{dump[:12000]}")
    return "".join(dumps)


def orphans(fake: FakeTelegram, chat_id: int, stored: list[str], killed_at: float | None) -> list:
    """Messages on screen that are not stored replies: allowed only as the one window the
    design leaves (docs/known-limitations.md): the dead replica's first words of a reply, sent
    before the kill, whose id it never learnt, so that nobody touched the message after the
    kill."""
    extra = [m for m in visible_messages(fake, chat_id) if m[2] not in stored]
    if killed_at is None:
        return extra
    edited_after = {
        int(c.params["message_id"]) for c in fake.edits_to(chat_id) if c.at >= killed_at
    }
    return [m for m in extra if m[1] >= killed_at or m[0] in edited_after]


async def check_exactly_once_in_order(
    deployment: Deployment, database: str, killed_at: float | None = None
) -> None:
    rows = await conversation(database)
    fake = deployment.fake
    for user in USERS:
        mine = [(text, replies) for who, text, _, replies in rows if who == user]
        # each message stored once, in the order it was sent
        assert [text for text, _ in mine] == [text_of(user, k) for k in range(MESSAGES)]
        # each answered exactly once
        assert [len(replies) for _, replies in mine] == [1] * MESSAGES, mine
        # ... and the user saw exactly those replies, one message each, in order
        stored = [replies[0] for _, replies in mine]

        def shown(u: int = user, r: list[str] = stored) -> list[str]:
            return [text for _, _, text in visible_messages(fake, u) if text in r]

        await eventually(lambda u=user, r=stored: shown(u, r) == r, f"user {user}'s replies")
        leftovers = [m for m in visible_messages(fake, user) if m[2] not in stored]
        assert len(leftovers) <= (1 if killed_at is not None else 0), leftovers
        assert orphans(fake, user, stored, killed_at) == [], leftovers
    # Each prompt holds exactly the user's earlier messages, up to the one it answers.
    prompts = [line for line in deployment.logs().splitlines() if "prompt:" in line]
    answered: set[tuple[int, int]] = set()
    for prompt in prompts:
        found = re.findall(r"Пользователь (\d+) пишет сообщение (\d+)", prompt)
        if not found:
            continue
        users = {int(u) for u, _ in found}
        assert len(users) == 1, prompt  # never another user's words
        numbers = [int(k) for _, k in found]
        assert numbers == list(range(max(numbers) + 1)), prompt  # all earlier ones, in order
        answered.add((users.pop(), max(numbers)))
    assert answered == {(u, k) for u in USERS for k in range(MESSAGES)}


async def test_two_replicas_answer_each_message_once_in_order(deployment):
    await deployment.start(2)
    send_all(deployment.fake)
    await wait_answered(deployment, deployment.database)
    await check_exactly_once_in_order(deployment, deployment.database)
    # the proxy really spread the updates over both replicas
    assert min(deployment.proxy.forwarded) >= 10, deployment.proxy.forwarded


async def test_a_replica_killed_mid_run_loses_nothing_and_repeats_nothing(deployment):
    await deployment.start(2)
    send_all(deployment.fake)
    # kill -9 one replica while replies are being made
    await eventually(
        lambda: deployment.fake.count("sendMessage") >= 12, "the first replies", timeout=120
    )
    victim = deployment.replicas[0]
    victim.process.send_signal(signal.SIGKILL)
    await victim.process.wait()
    killed_at = time.monotonic()
    assert await replies_stored(deployment.database) < len(USERS) * MESSAGES  # mid-run
    await wait_answered(deployment, deployment.database)
    await check_exactly_once_in_order(deployment, deployment.database, killed_at)
    assert deployment.fake.webhook_backlog() == 0


async def test_a_reset_among_messages_is_carried_out_in_its_place_while_telegram_hangs(deployment):
    """A user writes twice, /reset, twice more, while Telegram hangs on the first reply. Every
    update is acknowledged at once (the /reset used to hold its webhook request waiting for
    the user's lease, then reset without it); the replies before /reset are delivered, then
    the confirmation, then replies that know nothing of before. With PENDING_REPLY_MAX_AGE_S=0
    (no late answers after a restart) live messages are still answered (they were not)."""
    from bot import texts

    user = 2101
    deployment.env.update(REQUEST_TIMEOUT_S="3", PENDING_REPLY_MAX_AGE_S="0")  # lease wait 8 s
    await deployment.start(2)
    fake = deployment.fake
    fake.hold("sendMessage")
    fake.send_text(user, text_of(user, 0))
    fake.send_text(user, text_of(user, 1))
    fake.send_text(user, "/reset")
    fake.send_text(user, text_of(user, 2))
    fake.send_text(user, text_of(user, 3))
    await eventually(lambda: fake.webhook_backlog() == 0, "all five acknowledged", timeout=20)
    fake.release("sendMessage")
    await eventually(lambda: len(fake.sent_to(user)) >= 5, "four replies and the confirmation")
    for _ in range(300):  # the last reply is stored just after Telegram took it
        rows = await conversation(deployment.database)
        if all(replies for who, _, _, replies in rows if who == user):
            break
        await asyncio.sleep(0.1)
    assert [(text, len(replies)) for who, text, _, replies in rows if who == user] == [
        (text_of(user, 2), 1),
        (text_of(user, 3), 1),
    ]
    shown = fake.sent_to(user)
    assert shown[2] == texts.RESET_DONE, shown
    assert len(shown) == 5 and shown.count(texts.RESET_DONE) == 1, shown
    prompts = [
        [int(k) for k in re.findall(rf"Пользователь {user} пишет сообщение (\d+)", line)]
        for line in deployment.logs().splitlines()
        if "prompt:" in line and f"Пользователь {user}" in line
    ]
    # Each reply knew exactly what came before it since the /reset. A reply may be generated
    # twice (a replica starved past its lease hands the user over, as on a loaded CI machine:
    # [[0], [0, 1], [2], [2], [2, 3]] was seen), never shown or stored twice (checked above).
    assert sorted(set(map(tuple, prompts))) == [(0,), (0, 1), (2,), (2, 3)], prompts
    connection = await asyncpg.connect(deployment.database)
    try:
        roles = await connection.fetch(
            "SELECT m.role FROM messages m JOIN users u ON u.id = m.user_id "
            "WHERE u.telegram_id = $1",
            user,
        )
    finally:
        await connection.close()
    assert sorted(r["role"] for r in roles) == ["bot", "bot", "user", "user"]  # reset carried out


async def test_a_replica_that_stalls_past_its_lease_neither_sends_nor_stores_once_it_wakes(
    deployment,
):
    """The replica writing a reply freezes (SIGSTOP: a paused VM) while Telegram hangs on its
    message; the survivor takes the lease over and answers. When the frozen one wakes, with its
    message ready to be sent again, it stops instead: one reply on screen, one stored (it used
    to send and store a second)."""
    user = 2301
    await deployment.start(2)
    fake = deployment.fake
    fake.hold("sendMessage")
    fake.send_text(user, text_of(user, 0))

    def writing() -> list[BotProcess]:
        return [r for r in deployment.replicas if r.log.exists() and "prompt:" in r.log.read_text()]

    await eventually(lambda: len(writing()) == 1 and fake.count("sendMessage") >= 1, "a reply")
    frozen = writing()[0]
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        fake.release("sendMessage")  # its message is refused; it would retry on waking
        for _ in range(600):  # the survivor answers once the lease has run out (2 s)
            if await replies_stored(deployment.database) >= 1:
                break
            await asyncio.sleep(0.1)
        assert await replies_stored(deployment.database) == 1, deployment.logs()[-3000:]
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    await eventually(
        lambda: "stopped answering" in frozen.log.read_text(), "the woken replica gives up"
    )
    assert await replies_stored(deployment.database) == 1
    assert len(fake.sent_to(user)) == 1, fake.sent_to(user)


async def test_messages_stored_while_redis_hangs_are_answered_once_it_is_back(
    deployment, redis_url
):
    """Redis stops answering (SIGSTOP) after a first reply: the replicas still acknowledge and
    store the user's next messages, fail to take the lease (logged), and once Redis is back the
    sweep answers each of them, once, in order."""
    from tests.servers import REDIS_PROCESSES

    user = 2401
    await deployment.start(2)
    fake = deployment.fake
    fake.send_text(user, text_of(user, 0))
    await eventually(lambda: len(fake.sent_to(user)) == 1, "the first reply")
    redis = REDIS_PROCESSES[redis_url]
    redis.send_signal(signal.SIGSTOP)
    try:
        fake.send_text(user, text_of(user, 1))
        fake.send_text(user, text_of(user, 2))
        await eventually(lambda: fake.webhook_backlog() == 0, "both stored and acknowledged")
        await eventually(
            lambda: f"could not answer user {user}" in deployment.logs(),
            "a replica failing to reach Redis",
        )
    finally:
        redis.send_signal(signal.SIGCONT)
    for _ in range(600):
        rows = [r for r in await conversation(deployment.database) if r[0] == user]
        if len(rows) == 3 and all(replies for *_, replies in rows):
            break
        await asyncio.sleep(0.1)
    assert [(text, len(replies)) for _, text, _, replies in rows] == [
        (text_of(user, k), 1) for k in range(3)
    ], deployment.logs()[-3000:]
    stored = [replies[0] for *_, replies in rows]
    await eventually(lambda: fake.sent_to(user) == stored, "the user sees each reply once")


async def test_a_page_message_among_telegram_messages_is_answered_once_in_its_place(deployment):
    """The Mini App's message goes to a replica directly while the user's Telegram messages
    go through the proxy: each message is answered once (the page's under the same lease),
    in the order stored (the Telegram messages stored after the page's wait for its answer),
    and the page's reply goes to the page, not to the Telegram chat."""
    from bot.webapp.auth import sign_init_data
    from tests.bot.harness import TOKEN

    await deployment.start(2)
    user = USERS[0]
    for k in range(3):
        deployment.fake.send_text(user, text_of(user, k))
    headers = {"Authorization": f"tma {sign_init_data(TOKEN, user, 'Анна')}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{deployment.ports[1]}/app/api/messages",
            json={"text": "Сообщение со страницы"},
            headers=headers,
        ) as response,
    ):
        assert response.status == 200
        last = (await response.text()).splitlines()[-1]
    for k in range(3, 5):
        deployment.fake.send_text(user, text_of(user, k))

    async def answered() -> list[tuple[int, str, int, list[str]]]:
        return [row for row in await conversation(deployment.database) if row[0] == user]

    deadline = time.monotonic() + 120
    while len([r for r in await answered() if r[3]]) < 6:
        assert time.monotonic() < deadline, (await answered(), deployment.logs()[-3000:])
        await asyncio.sleep(0.2)
    rows = await answered()
    assert [len(replies) for *_, replies in rows] == [1] * 6
    page = next(r for r in rows if r[1] == "Сообщение со страницы")
    assert json.loads(last) == {"done": True, "text": page[3][0], "stored": True}
    connection = await asyncpg.connect(deployment.database)
    try:
        reply_ids = [
            await connection.fetchval("SELECT id FROM messages WHERE reply_to_id = $1", r[2])
            for r in rows
        ]
    finally:
        await connection.close()
    assert reply_ids == sorted(reply_ids), (rows, reply_ids)  # answered in the order stored
    telegram = [r[3][0] for r in rows if r is not page]
    await eventually(lambda: len(deployment.fake.sent_to(user)) >= 5, "the Telegram replies")
    assert deployment.fake.sent_to(user) == telegram  # the page's reply is not among them


async def test_postgresql_restarting_loses_no_message_and_answers_each_once(
    deployment, postgres_server
):
    """PostgreSQL goes down (a restart: connections terminated) while a user writes: the
    webhook answers 5xx while the message cannot be stored, so Telegram delivers it again, and
    once the database is back every message is answered once, in order, with no apology. The
    error used to be handled (an apology sent) and the webhook answered 200: Telegram
    never sent the update again and the message was lost."""
    from bot import texts

    await deployment.start(2)
    fake, user = deployment.fake, USERS[0]
    fake.send_text(user, text_of(user, 0))
    deadline = time.monotonic() + 120
    while await replies_stored(deployment.database) < 1:  # stored: nothing of it is in flight
        assert time.monotonic() < deadline, deployment.logs()[-3000:]
        await asyncio.sleep(0.2)
    attempts = fake.webhook_attempts
    postgres_server.go_down()
    try:
        for k in (1, 2):
            fake.send_text(user, text_of(user, k))
        # the first of them refused at least once (delivered in order, one at a time)
        await eventually(lambda: fake.webhook_attempts >= attempts + 2, "a refused delivery")
    finally:
        postgres_server.start()

    async def answered() -> list[tuple[str, int]]:
        rows = await conversation(deployment.database)
        return [
            (text, len(replies)) for telegram_id, text, _, replies in rows if telegram_id == user
        ]

    deadline = time.monotonic() + 120
    while [n for _, n in await answered()] != [1, 1, 1]:
        assert time.monotonic() < deadline, (await answered(), deployment.logs()[-3000:])
        await asyncio.sleep(0.2)
    assert await answered() == [(text_of(user, k), 1) for k in range(3)]
    stored = [
        replies[0]
        for telegram_id, _, _, replies in await conversation(deployment.database)
        if telegram_id == user
    ]
    try:
        await eventually(lambda: fake.sent_to(user) == stored, "each reply shown once")
    except AssertionError:
        assert fake.sent_to(user) == stored, deployment.logs()[-6000:]
    assert texts.ERROR not in fake.sent_to(user)
