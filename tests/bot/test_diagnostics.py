"""``kill -USR1 <pid>``: the bot logs where each of its tasks waits (bot.diagnostics), goes on."""

import asyncio
import signal

from bot.diagnostics import describe_tasks
from tests.bot.harness import ALICE, BotProcess, bot_replies, eventually

DUMP = "where each task waits (SIGUSR1)"


async def test_the_dump_follows_each_await_down_to_what_it_waits_for():
    released = asyncio.Event()

    async def innermost() -> None:
        await released.wait()

    async def outer() -> None:
        await innermost()

    async def follower(task: asyncio.Task[None]) -> None:
        await task

    first = asyncio.create_task(outer(), name="first")
    second = asyncio.create_task(follower(first), name="second")
    await asyncio.sleep(0)  # both start and suspend
    await asyncio.sleep(0)
    text = describe_tasks({first, second})
    released.set()
    await second
    first_entry, second_entry = text.split("task second:")
    assert "in outer" in first_entry and "in innermost" in first_entry
    assert first_entry.index("in outer") < first_entry.index("in innermost")
    assert "locks.py" in first_entry  # down into Event.wait, where it really waits
    assert "waiting for <Future pending" in first_entry
    assert "in follower" in second_entry and "waiting for task first" in second_entry


async def test_kill_usr1_shows_a_reply_stuck_on_telegram_and_the_bot_goes_on(
    fake, bot_env, tmp_path
):
    """An operator whose bot went quiet sends SIGUSR1: the log names the reply's await on the
    Bot API (here Telegram hangs on sendMessage); once Telegram answers, the reply arrives."""
    db, log = tmp_path / "bot.db", tmp_path / "bot.log"
    bot = BotProcess(bot_env, log)
    try:
        await bot.start(fake)
        fake.hold("sendMessage")
        fake.send_text(ALICE, "Как дела?")
        await eventually(lambda: fake.count("sendMessage") >= 1, "the reply held by Telegram")
        bot.process.send_signal(signal.SIGUSR1)
        await eventually(lambda: DUMP in log.read_text(errors="replace"), "the task dump")
        dump = log.read_text(errors="replace").split(DUMP, 1)[1]
        assert "bot/conversation.py" in dump and "in _answer" in dump, dump[-3000:]
        assert "bot/streaming.py" in dump and "in _send" in dump, dump[-3000:]
        fake.release("sendMessage")
        await eventually(lambda: len(bot_replies(db, ALICE)) == 1, "the reply, Telegram back")
        assert bot.process.returncode is None
    finally:
        if bot.process is not None and bot.process.returncode is None:
            await bot.stop()
