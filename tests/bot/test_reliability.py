"""The real bot process under faults and hostile use (fake Bot API server on 127.0.0.1)."""

import asyncio
import json
import os
import re
import signal
import sqlite3
import time

import aiohttp
import asyncpg
import pytest

from bot import texts
from tests.bot.fake_telegram import FakeTelegram
from tests.bot.harness import (
    ALICE,
    BOB,
    BotProcess,
    answered,
    bot_replies,
    eventually,
    stored_messages,
)
from tests.servers import CommitReplyLoss, free_port, silenced_connections

GROUP = -5001


@pytest.fixture
async def running(fake, bot_env, tmp_path):
    """Start the bot with extra settings: ``bot = await running(EXTRA=...)``."""
    started: list[BotProcess] = []

    async def start(wait: bool = True, **extra: str) -> BotProcess:
        bot = BotProcess({**bot_env, **extra}, tmp_path / "bot.log")
        started.append(bot)
        await bot.start(fake, wait=wait)
        return bot

    yield start
    for bot in started:
        bot.kill()


async def test_flood_control_is_waited_out_and_the_reply_still_arrives(fake, running):
    await running()
    fake.fail_next("sendMessage", 429, 429)
    sent = time.monotonic()
    fake.send_text(ALICE, "/help")
    replies = await fake.wait_replies(ALICE, 1)
    assert "/reset" in replies[0]
    assert time.monotonic() - sent >= 2  # retry_after=1, twice
    assert fake.count("sendMessage") == 3  # two refused, one delivered


async def test_server_errors_while_sending_are_retried(fake, running):
    await running()
    fake.fail_next("sendMessage", 502, 500)
    fake.send_text(ALICE, "/help")
    assert len(await fake.wait_replies(ALICE, 1)) == 1


async def test_polling_survives_getupdates_failing_three_times(fake, running):
    fake.fail_next("getUpdates", 500, 502, 503)
    await running()
    fake.send_text(ALICE, "/start")
    assert len(await fake.wait_replies(ALICE, 1, timeout=60)) == 1
    assert not fake.faults["getUpdates"]


async def test_a_webhook_left_by_an_earlier_run_does_not_stop_polling(fake, running, tmp_path):
    """An operator ran the bot in webhook mode, then went back to polling: Telegram refuses
    getUpdates (409) while a webhook is registered, and the bot polled in vain, answering
    nobody. It now deletes the webhook first, saying so in its log."""
    fake.registered_webhook = "https://old.example.com/webhook"
    await running()
    fake.send_text(ALICE, "/start")
    assert len(await fake.wait_replies(ALICE, 1, timeout=60)) == 1
    assert fake.registered_webhook is None
    log = (tmp_path / "bot.log").read_text(errors="replace")
    assert "a webhook is registered for this bot (https://old.example.com/webhook" in log


async def test_a_user_not_on_the_allowlist_gets_one_refusal_and_nothing_is_stored(
    fake, running, tmp_path
):
    await running(ALLOWED_USER_IDS=f"{ALICE}")
    # One getUpdates batch, handled as tasks in order: Bob's second message is decided (with
    # no await: he is already refused) before Alice's /start is even read, let alone answered.
    fake.send_text(BOB, "Привет!")
    fake.send_text(BOB, "Ну ответь!")
    fake.send_text(ALICE, "/start")
    await fake.wait_replies(ALICE, 1)
    await fake.wait_replies(BOB, 1)
    assert fake.sent_to(BOB) == [texts.NOT_ALLOWED]
    assert stored_messages(tmp_path / "bot.db", BOB) == []
    with sqlite3.connect(tmp_path / "bot.db") as db:
        assert (
            db.execute("SELECT count(*) FROM users WHERE telegram_id = ?", (BOB,)).fetchone()[0]
            == 0
        )


async def test_group_chat_answers_only_when_addressed_and_remembers_per_chat(
    fake, running, tmp_path
):
    fake.group_admins.add((GROUP, ALICE))  # the group's settings are its admins' to change
    await running()
    fake.send_text(ALICE, "просто болтаем между собой", chat_id=GROUP)
    to_bot = [fake.send_text(BOB, "@test_bot привет, бот!", chat_id=GROUP)]
    await fake.wait_replies(GROUP, 1)
    bot_message = {
        "message_id": 1,
        "date": int(time.time()),
        "chat": {"id": GROUP, "type": "group", "title": "Группа"},
        "from": {"id": 42, "is_bot": True, "first_name": "Тестбот"},
        "text": "ответ",
    }
    to_bot.append(
        fake.send_text(ALICE, "а это ответ боту", chat_id=GROUP, reply_to_message=bot_message)
    )
    fake.send_text(ALICE, "/temp@test_bot 0.4", chat_id=GROUP)
    db = tmp_path / "bot.db"
    await eventually(lambda: len(bot_replies(db, GROUP)) == 2, "both replies in the group")
    await fake.wait_replies(GROUP, 3)  # and the /temp answer
    replies = fake.sent_to(GROUP)
    assert len(replies) == 3 and any("0.4" in r for r in replies)
    memory = stored_messages(db, GROUP)  # kept under the chat, not the users
    assert [t for r, t in memory if r == "user"] == ["привет, бот!", "а это ответ боту"]
    assert stored_messages(tmp_path / "bot.db", ALICE) == []
    # each reply quotes the message it answers: several people talk to the bot there
    quoted = [
        json.loads(c.params["reply_parameters"])["message_id"]
        for c in fake.calls
        if c.method == "sendMessage" and c.ok and "reply_parameters" in c.params
    ]
    assert quoted == [fake.delivered[u]["message"]["message_id"] for u in to_bot]


async def test_forget_deletes_everything_about_the_user(fake, running, tmp_path):
    await running()
    fake.send_text(ALICE, "Меня зовут Алиса")
    fake.send_text(ALICE, "/temp 0.3")
    fake.send_text(BOB, "Я Боб")
    await fake.wait_replies(ALICE, 2)
    # Bob's reply is stored after he has all of it: wait for that state, not his first message.
    await eventually(lambda: len(bot_replies(tmp_path / "bot.db", BOB)) == 1, "Bob's reply")
    fake.send_text(ALICE, "/forget")
    assert (await fake.wait_replies(ALICE, 3))[-1] == texts.FORGET_DONE
    with sqlite3.connect(tmp_path / "bot.db") as db:
        assert (
            db.execute("SELECT count(*) FROM users WHERE telegram_id = ?", (ALICE,)).fetchone()[0]
            == 0
        )
    assert stored_messages(tmp_path / "bot.db", ALICE) == []
    assert len(stored_messages(tmp_path / "bot.db", BOB)) == 2


async def test_stats_for_admins_only(fake, running, tmp_path):
    await running(ADMIN_USER_IDS=str(ALICE))
    fake.send_text(ALICE, "Привет!")
    await eventually(lambda: len(bot_replies(tmp_path / "bot.db", ALICE)) == 1, "the reply")
    fake.send_text(BOB, "/stats")
    fake.send_text(ALICE, "/stats")
    assert (await fake.wait_replies(BOB, 1))[0] == texts.ADMINS_ONLY
    stats = (await fake.wait_replies(ALICE, 2))[-1]
    assert "Пользователей: 1" in stats and "Сообщений: 2" in stats
    assert "В очереди к модели: 0" in stats and "ответов 1" in stats


async def test_health_before_and_after_the_model_loads_and_metrics(fake, running):
    port = free_port()
    await running(wait=False, HEALTH_PORT=str(port))
    statuses: list[int] = []
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 90
        while (not statuses or statuses[-1] != 200) and time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    statuses.append(response.status)
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.01)
        assert statuses[0] == 503 and statuses[-1] == 200
        await fake.wait_for(lambda: fake.count("getUpdates") > 0)
        fake.send_text(ALICE, "Привет!")
        body = ""
        deadline = time.monotonic() + 60
        while "bot_replies_total 1.0" not in body:  # counted once the reply is delivered
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.05)
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                body = await response.text()
    assert "bot_updates_total 1.0" in body and "bot_replies_total 1.0" in body
    assert "bot_generation_seconds_bucket" in body and "bot_queue_depth 0.0" in body
    threads = re.search(r"^bot_engine_threads (\S+)$", body, re.MULTILINE)
    assert threads is not None and 1 <= float(threads.group(1)) <= (os.cpu_count() or 1)
    assert re.search(r"^bot_engine_openmp_stalls \d", body, re.MULTILINE)


async def test_webhook_checks_the_secret_and_serves_health(fake, running, tmp_path):
    port = free_port()
    await running(
        wait=False,
        WEBHOOK_URL="https://bot.example/webhook",
        WEBHOOK_SECRET="s3cret-Token",
        LISTEN_PORT=str(port),
    )
    await fake.wait_for(lambda: fake.count("setWebhook") == 1, timeout=90)
    call = next(c for c in fake.calls if c.method == "setWebhook")
    db = tmp_path / "bot.db"
    assert call.params["secret_token"] == "s3cret-Token"
    url = f"http://127.0.0.1:{port}/webhook"
    update = FakeTelegram.update(1, ALICE, **FakeTelegram.text_content("Привет!"))
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=update) as response:
            assert response.status in (401, 403)
        wrong = {"X-Telegram-Bot-Api-Secret-Token": "guess"}
        async with http.post(url, json=update, headers=wrong) as response:
            assert response.status in (401, 403)
        # The refusal is the answer to the request: nothing was fed to the dispatcher.
        assert fake.sent_to(ALICE) == [] and stored_messages(db, ALICE) == []
        right = {"X-Telegram-Bot-Api-Secret-Token": "s3cret-Token"}
        async with http.post(url, json=update, headers=right) as response:
            assert response.status == 200
        # Telegram delivers the same update again (our 200 came too late for it): answered once.
        async with http.post(url, json=update, headers=right) as response:
            assert response.status == 200
        later = FakeTelegram.update(2, ALICE, **FakeTelegram.text_content("Как дела?"))
        async with http.post(url, json=later, headers=right) as response:
            assert response.status == 200
        # Alice's turns are answered in order, so once the later message is answered the
        # repeated update has been handled too.
        await eventually(lambda: len(bot_replies(db, ALICE)) == 2, "both replies")
        assert [t for r, t in stored_messages(db, ALICE) if r == "user"] == ["Привет!", "Как дела?"]
        assert fake.sent_to(ALICE) == bot_replies(db, ALICE)
        async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200


async def _kill_mid_reply(fake, running, db) -> None:  # type: ignore[no-untyped-def]
    """Alice's first message is answered; the bot is killed while her second one's reply is
    being generated and streamed (Telegram hangs on it, so the user never saw any of it)."""
    bot = await running(REPLY_TOKENS="512", STREAM_EDIT_INTERVAL_S="0")
    fake.send_text(ALICE, "Первое сообщение")
    await eventually(lambda: len(bot_replies(db, ALICE)) == 1, "the first reply")
    fake.hold("sendMessage")
    sends = fake.count("sendMessage")
    fake.send_text(ALICE, "Это сообщение не должно потеряться")
    await fake.wait_for(lambda: fake.count("sendMessage") > sends)  # the reply's first words
    bot.process.send_signal(signal.SIGKILL)
    await bot.process.wait()
    fake.release("sendMessage")
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert stored_messages(db, ALICE)[-1] == ("user", "Это сообщение не должно потеряться")
    assert len(fake.sent_to(ALICE)) == 1  # the held reply never reached her


async def test_kill_9_mid_reply_then_the_restarted_bot_answers_it_once(fake, running, tmp_path):
    db = tmp_path / "bot.db"
    await _kill_mid_reply(fake, running, db)
    await running()
    fake.send_text(ALICE, "Ты снова тут?")
    # Unanswered messages take their turns before the first update: the lost one is answered
    # first, then the new one, whose prompt holds the lost message and its answer.
    await eventually(lambda: len(bot_replies(db, ALICE)) == 3, "the two replies after restart")
    pairs = answered(db, ALICE)
    assert [m for m, _ in pairs] == [
        "Первое сообщение",
        "Это сообщение не должно потеряться",
        "Ты снова тут?",
    ]
    assert all(reply is not None for _, reply in pairs)
    assert fake.sent_to(ALICE) == bot_replies(db, ALICE)  # one answer to each message
    prompts = [
        ln
        for ln in (tmp_path / "bot.log").read_text(errors="replace").splitlines()
        if "prompt:" in ln
    ]
    assert "Это сообщение не должно потеряться" in prompts[-1]
    assert pairs[1][1] in prompts[-1]


async def test_a_reply_cut_by_kill_9_is_finished_in_the_message_the_user_already_has(
    fake, running, tmp_path
):
    """The first words of a reply reached the user, then the bot was killed. The restarted
    bot writes the reply into that same message: before, the cut text stayed on screen above
    a second, whole reply."""
    db = tmp_path / "bot.db"
    bot = await running(REPLY_TOKENS="512", STREAM_EDIT_INTERVAL_S="0")
    fake.hold("editMessageText")
    # The stream edits its message only once the message was sent (and its id kept): a held
    # edit means the first words are on the user's screen. The tiny random model ends about
    # one reply in twenty at once (a speaker tag first): that reply goes out whole, in one
    # message, with no edit to hold, and the next message is the one to cut.
    for answered_whole in range(5):
        fake.send_text(ALICE, "Привет!")
        await eventually(
            lambda n=answered_whole: (
                fake.count("editMessageText") > 0 or len(bot_replies(db, ALICE)) > n
            ),
            "the reply's first words (or the whole reply)",
        )
        if fake.count("editMessageText") > 0:
            break
    else:
        pytest.fail("five replies in a row went out whole: none to cut")
    bot.process.send_signal(signal.SIGKILL)
    await bot.process.wait()
    fake.release("editMessageText")
    cut = fake.sent_to(ALICE)
    assert len(cut) == answered_whole + 1 and len(bot_replies(db, ALICE)) == answered_whole
    await running()
    await eventually(
        lambda: len(bot_replies(db, ALICE)) == answered_whole + 1, "the reply after the restart"
    )
    await eventually(lambda: fake.sent_to(ALICE) == bot_replies(db, ALICE), "the reply shown")
    sends = [c for c in fake.calls if c.method == "sendMessage" and c.ok]
    # one message per reply on the user's screen, the cut one holding the whole reply
    assert len(sends) == answered_whole + 1
    assert "earlier attempt died mid-reply" in (tmp_path / "bot.log").read_text(errors="replace")


async def test_a_message_older_than_the_limit_is_not_answered_after_a_restart(
    fake, running, tmp_path
):
    db = tmp_path / "bot.db"
    await _kill_mid_reply(fake, running, db)
    await asyncio.sleep(1.5)  # the lost message is now older than the limit below
    await running(PENDING_REPLY_MAX_AGE_S="1")
    fake.send_text(ALICE, "Ты снова тут?")
    await eventually(lambda: len(bot_replies(db, ALICE)) == 2, "the reply to the new message")
    # Had the old message been answered, its answer would have come before this one.
    assert [reply is None for _, reply in answered(db, ALICE)] == [False, True, False]
    assert fake.sent_to(ALICE) == bot_replies(db, ALICE)


async def test_a_reply_telegram_refused_past_the_outage_allowance_is_sent_at_the_next_start(
    fake, running, tmp_path
):
    """In a forum group's topic, Telegram refusing the reply longer than TELEGRAM_OUTAGE_S:
    the message stays owed, with no apology (sent once Telegram was back, it stood beside the
    reply), and the restarted bot sends the reply to that topic (it went to the group's
    general topic when only the first handler knew the topic)."""
    db = tmp_path / "bot.db"
    bot = await running(STREAM_REPLIES="false", TELEGRAM_OUTAGE_S="0")
    fake.fail_next("sendMessage", *[500] * 5)  # longer than the bot's 5 attempts
    topic = {"message_thread_id": 7, "is_topic_message": True}
    fake.send_text(ALICE, "@test_bot Привет!", chat_id=GROUP, **topic)
    await fake.wait_for(lambda: not fake.faults["sendMessage"], timeout=60)
    log = tmp_path / "bot.log"
    await eventually(
        lambda: "error while handling update" in log.read_text(errors="replace"), "the failure"
    )
    await bot.stop()
    assert bot_replies(db, GROUP) == []  # the refused reply is not taken for a delivered one
    assert fake.sent_to(GROUP) == []  # and no apology
    await running()
    await eventually(lambda: len(bot_replies(db, GROUP)) == 1, "the reply after the restart")
    assert fake.sent_to(GROUP) == bot_replies(db, GROUP)
    sent = [c for c in fake.calls if c.method == "sendMessage" and c.ok]
    assert [int(c.params.get("message_thread_id", 0)) for c in sent] == [7]


async def test_a_reply_telegram_refuses_for_a_while_arrives_whole_once_it_is_back(
    fake, running, tmp_path
):
    """Telegram answers 502 to the reply for longer than one call's retries (seven tries,
    some ten seconds): the bot keeps trying its final text, and the user gets the reply once,
    with no apology beside it. It used to give up after the retries and apologise."""
    db = tmp_path / "bot.db"
    await running(STREAM_REPLIES="false")
    fake.fail_next("sendMessage", *[502] * 7)
    fake.send_text(ALICE, "Привет!")
    await eventually(lambda: len(bot_replies(db, ALICE)) == 1, "the reply", timeout=90)
    assert not fake.faults["sendMessage"]
    assert fake.sent_to(ALICE) == bot_replies(db, ALICE)  # the reply, once, and nothing else


async def test_a_reply_streamed_as_a_draft_and_cut_by_kill_9_leaves_one_message(
    fake, running, tmp_path
):
    """Drafts offered: the bot is killed while the reply shows as a draft (or, the tiny model
    ending a reply at once, while its only message is on the wire). The restarted bot sends
    the reply once: nothing of the first attempt stays on the user's screen (with edits, its
    first words stayed as a message of their own whenever the kill came before their id was
    kept)."""
    db = tmp_path / "bot.db"
    fake.drafts_offered = True
    bot = await running(REPLY_TOKENS="512", STREAM_EDIT_INTERVAL_S="0")
    fake.hold("sendMessage")
    fake.send_text(ALICE, "Привет!")
    await fake.wait_for(lambda: fake.drafts_to(ALICE) or fake.count("sendMessage"), timeout=60)
    bot.process.send_signal(signal.SIGKILL)
    await bot.process.wait()
    fake.release("sendMessage")
    assert fake.sent_to(ALICE) == [] and bot_replies(db, ALICE) == []
    await running()
    await eventually(lambda: len(bot_replies(db, ALICE)) == 1, "the reply after the restart")
    await eventually(lambda: fake.sent_to(ALICE) == bot_replies(db, ALICE), "the reply, once")
    assert fake.count("editMessageText") == 0


async def test_an_update_polled_again_is_answered_once(fake, running, tmp_path):
    db = tmp_path / "bot.db"
    bot = await running()
    first = fake.send_text(ALICE, "Привет!")
    await eventually(lambda: len(bot_replies(db, ALICE)) == 1, "the first reply")
    fake.redeliver(first, now=True)  # the running bot polls it a second time
    fake.send_text(ALICE, "Как дела?")
    # Alice's turns are answered in order: once the later message is answered, the repeated
    # update (polled before it) has been handled too.
    await eventually(lambda: len(bot_replies(db, ALICE)) == 2, "the second reply")
    await bot.stop()
    fake.redeliver(first)  # not seen acknowledged: offered again to the restarted bot
    await running()
    fake.send_text(ALICE, "Что нового?")
    await eventually(lambda: len(bot_replies(db, ALICE)) == 3, "the third reply")
    assert [m for m, _ in answered(db, ALICE)] == ["Привет!", "Как дела?", "Что нового?"]
    assert fake.sent_to(ALICE) == bot_replies(db, ALICE)  # one reply to each message


async def test_a_locked_database_delays_but_loses_no_message(fake, running, tmp_path):
    await running()
    fake.send_text(ALICE, "/start")
    await fake.wait_replies(ALICE, 1)
    locker = sqlite3.connect(tmp_path / "bot.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    fake.send_text(ALICE, "Сообщение во время блокировки")
    await asyncio.sleep(2)
    locker.execute("COMMIT")
    locker.close()
    await fake.wait_replies(ALICE, 2, timeout=60)
    assert ("user", "Сообщение во время блокировки") in stored_messages(tmp_path / "bot.db", ALICE)


async def test_a_flooding_user_is_answered_in_order_without_starving_others(
    fake, running, tmp_path
):
    await running()
    for i in range(20):
        fake.send_text(ALICE, f"сообщение номер {i}")
    await asyncio.sleep(0.05)
    fake.send_text(BOB, "Я тоже тут")
    await fake.wait_replies(BOB, 1, timeout=120)
    assert len(fake.sent_to(ALICE)) < 20  # Bob did not wait for all of Alice's messages
    await fake.wait_replies(ALICE, 20, timeout=180)
    prompts = [
        ln
        for ln in (tmp_path / "bot.log").read_text(errors="replace").splitlines()
        if "prompt:" in ln and "сообщение номер" in ln and "Я тоже тут" not in ln
    ]
    last_numbers = [int(p.rsplit("сообщение номер ", 1)[1].split()[0]) for p in prompts]
    assert last_numbers == list(range(20))  # each reply answered its own message, in order


async def test_info_logs_hold_neither_the_token_nor_message_texts(fake, running, tmp_path):
    bot = await running(LOG_LEVEL="INFO")
    fake.send_text(ALICE, "Секретная фраза Алисы про пароль")
    await fake.wait_replies(ALICE, 1)
    fake.fail_next("sendMessage", 500)  # a logged failure on the way
    fake.send_text(ALICE, "/help")
    await fake.wait_replies(ALICE, 2)
    await bot.stop()
    log = (tmp_path / "bot.log").read_text(errors="replace")
    reply = fake.sent_to(ALICE)[0]
    assert "Секретная фраза" not in log and (len(reply) < 8 or reply not in log)
    assert "TEST-token-never-logged" not in log and "polling as" in log


async def test_a_bot_api_without_setmycommands_or_typing_still_gets_replies(
    fake, running, tmp_path
):
    fake.fail_next("setMyCommands", 404)
    fake.fail_next("sendChatAction", 500, 500)
    await running()
    fake.send_text(ALICE, "Привет!")
    assert len(await fake.wait_replies(ALICE, 1)) == 1
    # the typing indicator ends before the reply is stored: so does its failure's logging
    await eventually(lambda: len(bot_replies(tmp_path / "bot.db", ALICE)) == 1, "the reply")
    log = (tmp_path / "bot.log").read_text(errors="replace")
    assert "Task exception was never retrieved" not in log  # it was, with a traceback


async def test_a_blocked_user_is_ignored_in_private_and_in_groups(fake, running, tmp_path):
    """BLOCKED_USER_IDS: an operator's answer to an abusive user. Nothing answered, nothing
    stored, in a private chat or a group; everyone else is served as before."""
    db = tmp_path / "bot.db"
    await running(BLOCKED_USER_IDS=str(ALICE))
    fake.send_text(ALICE, "Привет!")
    fake.send_text(ALICE, "@test_bot Привет!", chat_id=GROUP)
    fake.send_text(BOB, "Привет!")
    await fake.wait_replies(BOB, 1)

    def ignored() -> int:
        log = (tmp_path / "bot.log").read_text(errors="replace")
        return log.count(f"ignored a message from blocked user {ALICE}")

    await eventually(lambda: ignored() == 2, "both of Alice's messages handled")
    assert fake.sent_to(ALICE) == [] and fake.sent_to(GROUP) == []
    assert stored_messages(db, ALICE) == [] and stored_messages(db, GROUP) == []


async def _until_stored(database: str, expected: list[tuple[str, int]]) -> None:
    """Wait until PostgreSQL holds ``expected``: (user message, replies to it), in order (a
    reply is stored just after Telegram took it), or fail showing what it holds."""
    deadline = time.monotonic() + 30
    while True:
        connection = await asyncpg.connect(database)
        try:
            rows = await connection.fetch(
                "SELECT m.text, (SELECT count(*) FROM messages r WHERE r.reply_to_id = m.id) "
                "AS n FROM messages m WHERE m.role = 'user' ORDER BY m.id"
            )
        finally:
            await connection.close()
        stored = [(row["text"], row["n"]) for row in rows]
        if stored == expected:
            return
        assert time.monotonic() < deadline, stored
        await asyncio.sleep(0.05)


async def test_a_database_connection_that_stops_answering_delays_a_message_but_loses_none(
    fake, running, postgres_url
):
    """The server behind the bot's pooled PostgreSQL connections stops answering on them (here
    their server processes are stopped; a failover or a network partition that drops packets
    looks the same from the bot), while new connections work. Before: the next message waited
    on a pooled connection for as long as the kernel kept it (here for ever): no reply, and
    none to anything the user sent after it."""
    await running(DATABASE_URL=postgres_url, DATABASE_TIMEOUT_S="2")  # margin on a busy CI
    fake.send_text(ALICE, "/start")
    fake.send_text(ALICE, "Первое сообщение")
    await fake.wait_replies(ALICE, 2)
    database = postgres_url.replace("+asyncpg", "")
    async with silenced_connections(database) as stopped:  # the bot's, idle in its pool
        assert stopped
        fake.send_text(ALICE, "Второе сообщение")
        fake.send_text(ALICE, "Третье сообщение")
        await fake.wait_replies(ALICE, 4, timeout=60)
    await _until_stored(
        database,
        [("Первое сообщение", 1), ("Второе сообщение", 1), ("Третье сообщение", 1)],
    )


@pytest.mark.parametrize(
    ("text", "committing"),
    [
        ("Второе сообщение", b"INSERT INTO messages"),  # one statement, committed by itself
        ("Меня зовут Аня", b"COMMIT"),  # with a fact: in a transaction
    ],
)
async def test_a_message_whose_commit_reply_was_lost_is_answered_once(
    fake, running, postgres_url, text, committing
):
    """PostgreSQL commits the user's message, and its reply to the bot is lost (the network
    fails at that moment): after its timeout the bot cannot know the write happened, stores
    again and finds the message there. Before: taken for Telegram delivering the update a
    second time, and left unanswered until the next start."""
    from sqlalchemy.engine import make_url

    relay = await CommitReplyLoss(make_url(postgres_url).port).start()
    database = postgres_url.replace("+asyncpg", "")
    try:
        await running(DATABASE_URL=relay.url(postgres_url), DATABASE_TIMEOUT_S="2")
        fake.send_text(ALICE, "/start")
        fake.send_text(ALICE, "Первое сообщение")
        await _until_stored(database, [("Первое сообщение", 1)])  # nothing left to commit
        relay.lose_next_commit_reply(committing)
        fake.send_text(ALICE, text)
        await asyncio.wait_for(relay.lost.wait(), 30)
        await fake.wait_replies(ALICE, 3, timeout=60)
        await _until_stored(database, [("Первое сообщение", 1), (text, 1)])
    finally:
        await relay.stop()
