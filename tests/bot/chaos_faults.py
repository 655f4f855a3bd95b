"""Fault runs (``make test-chaos``, ``tests.load.chaos``): one fault in the middle of a
conversation, then a check of what each user sees.

Two real replicas in webhook mode behind a round-robin proxy (or, for ``single_killed``, one
process polling), real PostgreSQL and Redis, the fake Telegram delivering by webhook and
retrying, drafts offered as Telegram offers them; the replicas reach Redis through a relay that
can slow it down. Four users write eight messages each; once a third of them are answered the
fault comes; then every message must be answered once, in order, and each user's chat must hold
exactly the stored replies: nothing lost, nothing shown twice, no orphan (the first words of a
reply left as a message of their own).

Not collected by ``make test`` (the file name does not start with ``test_``): each run starts
fresh processes and waits out a fault, about a minute each. ``CHAOS_RUNS`` runs per fault;
``CHAOS_RESULTS``: a file each run appends its counts to (one JSON object a line).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.bot.deployment import (
    Deployment,
    conversation,
    replica_env,
    text_of,
    visible_messages,
)
from tests.bot.fake_telegram import FakeTelegram
from tests.bot.harness import BotProcess
from tests.servers import TcpRelay, restart_redis

FAULTS = (
    "stall_past_lease",
    "redis_restart",
    "redis_latency_300ms",
    "postgres_restart",
    "telegram_5xx_20s",
    "replica_killed",
    "single_killed",
)
RUNS = int(os.environ.get("CHAOS_RUNS", "5"))
USERS = (3001, 3002, 3003, 3004)
MESSAGES = 8
LEASE_S = 2.0
REDIS_LATENCY_S = 0.3  # each way: every Redis call of a replica takes 600 ms more


async def answered_count(database: str) -> int:
    return sum(1 for *_, replies in await conversation(database) if replies)


def count_what_users_see(
    fake: FakeTelegram, rows: list[tuple[int, str, int, list[str]]]
) -> dict[str, int]:
    """Per user: messages with no reply (lost), replies on screen more often than stored
    (shown twice), bot messages that are no stored reply (orphans), and whether the replies
    on screen follow the stored order."""
    counts = Counter(lost=0, shown_twice=0, orphans=0, out_of_order=0, answered_twice=0)
    for user in USERS:
        mine = [(text, replies) for who, text, _, replies in rows if who == user]
        counts["lost"] += MESSAGES - sum(1 for _, replies in mine if replies)
        counts["answered_twice"] += sum(max(len(replies) - 1, 0) for _, replies in mine)
        stored = [replies[0] for _, replies in mine if replies]
        shown = [text for _, _, text in visible_messages(fake, user)]
        stored_counts, shown_counts = Counter(stored), Counter(shown)
        counts["shown_twice"] += sum(
            max(n - stored_counts[text], 0) for text, n in shown_counts.items() if text in stored
        )
        counts["orphans"] += sum(n for text, n in shown_counts.items() if text not in stored)
        first_shown = list(dict.fromkeys(text for text in shown if text in stored_counts))
        counts["out_of_order"] += int(first_shown != list(dict.fromkeys(stored)))
    return dict(counts)


async def inject(
    fault: str,
    deployment: Deployment,
    redis_url: str,
    postgres_server: Any,
    redis_relay: TcpRelay,
) -> None:
    replica = deployment.replicas[0]
    assert replica.process is not None
    if fault == "stall_past_lease":
        replica.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(LEASE_S + 3)
        replica.process.send_signal(signal.SIGCONT)
    elif fault == "redis_restart":
        await asyncio.to_thread(restart_redis, redis_url, 1.0)
    elif fault == "redis_latency_300ms":  # held to the end of the run
        redis_relay.delay_s = REDIS_LATENCY_S
    elif fault == "postgres_restart":
        await asyncio.to_thread(postgres_server.go_down)
        await asyncio.sleep(2)
        await asyncio.to_thread(postgres_server.start)
    elif fault == "telegram_5xx_20s":
        deployment.fake.fail_for(20, "sendMessage", "editMessageText", "sendMessageDraft")
        await asyncio.sleep(20)
    elif fault in ("replica_killed", "single_killed"):
        replica.process.send_signal(signal.SIGKILL)
        await replica.process.wait()
        if fault == "single_killed":  # the operator's restart
            again = BotProcess(replica.env, replica.log.with_suffix(".restarted.log"))
            await again.start(deployment.fake, wait=False)
            deployment.replicas.append(again)
    else:
        raise ValueError(fault)


@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("fault", FAULTS)
async def test_a_fault_mid_conversation(
    fault: str, run: int, fake, bot_env, tmp_path, redis_url, postgres_server
) -> None:
    database_url = postgres_server.new_database()
    database = database_url.replace("+asyncpg", "")
    fake.drafts_offered = True
    # The replicas' network path to Redis, which the latency fault slows down.
    redis_relay = await TcpRelay(urlsplit(redis_url).port).start()
    env = {**replica_env(bot_env, database_url, redis_relay.url(redis_url)), "REPLY_TOKENS": "24"}
    deployment = Deployment(fake, env, tmp_path)
    started = time.monotonic()
    try:
        if fault == "single_killed":  # the zero-setup way: one process, polling
            env = {k: v for k, v in env.items() if k not in ("REDIS_URL", "WEBHOOK_URL")}
            single = BotProcess(env, tmp_path / "single.log")
            await single.start(fake)
            deployment.replicas.append(single)
        else:
            await deployment.start(2)
        for k in range(MESSAGES):
            for user in USERS:
                fake.send_text(user, text_of(user, k))
        total = len(USERS) * MESSAGES
        deadline = time.monotonic() + 180
        while await answered_count(database) < total // 3:
            assert time.monotonic() < deadline, deployment.logs()[-3000:]
            await asyncio.sleep(0.2)
        await inject(fault, deployment, redis_url, postgres_server, redis_relay)
        deadline = time.monotonic() + 240
        while await answered_count(database) < total and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await asyncio.sleep(2 * LEASE_S)  # what a woken or late replica would still send
        counts = count_what_users_see(fake, await conversation(database))
        if fault == "redis_latency_300ms":  # the replicas did go through the slow path
            assert redis_relay.delayed > 0
        result = {"fault": fault, "run": run, "messages": total, **counts}
        result["seconds"] = round(time.monotonic() - started, 1)
        report = os.environ.get("CHAOS_RESULTS")
        if report:
            with Path(report).open("a") as out:
                out.write(json.dumps(result) + "\n")
        bad = {k: v for k, v in counts.items() if v}
        if bad:
            rows = await conversation(database)
            chats = {
                user: (
                    [r[3] for r in rows if r[0] == user],
                    [(i, text) for i, _, text in visible_messages(fake, user)],
                )
                for user in USERS
            }
            detail = tmp_path / "what-users-see.json"
            detail.write_text(json.dumps(chats, ensure_ascii=False, indent=1))
            for replica in deployment.replicas:  # the logs beside it, for reading later
                if replica.log.exists():
                    (tmp_path / f"kept-{replica.log.name}").write_bytes(replica.log.read_bytes())
            assert not bad, (bad, f"stored replies and what each chat shows: {detail}")
    finally:
        for replica in deployment.replicas:
            if replica.process is not None and replica.process.returncode is None:
                replica.process.send_signal(signal.SIGCONT)
            replica.kill()
        if deployment.proxy is not None:
            await deployment.proxy.stop()
        await redis_relay.stop()
