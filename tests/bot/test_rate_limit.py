"""The per-sender rate limit: a flood is cut, its sender told once, everyone else unaffected."""

import asyncio

import pytest
from sqlalchemy import text

from bot import texts
from tests.bot.recording_session import in_process_bot, text_update

LIMIT = 3


@pytest.fixture
async def limited(tmp_path, tiny_model_dir):
    dp, bot, session, db = await in_process_bot(
        f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
        tiny_model_dir,
        rate_limit_messages=LIMIT,
        rate_limit_window_s=3600,
        admin_user_ids="9",
    )
    yield dp, bot, session, db
    dp["dialogue"].backend.close()
    await db.dispose()


async def stored_user_messages(db, telegram_id: int) -> int:
    async with db.connect() as connection:
        return (
            await connection.execute(
                text(
                    "SELECT count(*) FROM messages m JOIN users u ON u.id = m.user_id "
                    "WHERE u.telegram_id = :id AND m.role = 'user'"
                ),
                {"id": telegram_id},
            )
        ).scalar_one()


async def test_a_flooding_user_is_cut_at_the_limit_and_told_once(limited):
    """Before, every message of a flood was stored and answered (hundreds of replies to a
    script, the database growing without bound)."""
    dp, bot, session, db = limited
    for update_id in range(1, 7):
        await dp.feed_raw_update(bot, text_update(update_id, 7, f"сообщение {update_id}"))
    shown = session.texts_to(7)
    assert len(shown) == LIMIT + 1 and shown[-1].startswith("Слишком много сообщений")
    assert shown.count(texts.TOO_MANY.format(limit=LIMIT, seconds="3600")) == 1
    assert await stored_user_messages(db, 7) == LIMIT  # the dropped ones are not kept
    # another user is not limited by the first one's flood; the bot's admins are not limited
    await dp.feed_raw_update(bot, text_update(20, 8, "Привет!"))
    assert len(session.texts_to(8)) == 1
    for update_id in range(30, 30 + LIMIT + 2):
        await dp.feed_raw_update(bot, text_update(update_id, 9, "проверка"))
    assert len(session.texts_to(9)) == LIMIT + 2
    assert "Слишком" not in " ".join(session.texts_to(9))
    assert dp["metrics"].throttled._value.get() == 3


async def test_the_limit_holds_across_replicas_sharing_redis(limited, redis_url):
    """Two replicas, one Redis: a sender's messages count together whichever replica gets
    them (each replica counting alone would let twice the limit through)."""
    from bot.app import build_dispatcher
    from bot.replicas import ReplicaCoordinator

    dp, bot, session, db = limited
    replicas = [await ReplicaCoordinator.connect(redis_url, lease_s=5, wait_s=1) for _ in range(2)]
    try:
        first, second = (
            build_dispatcher(dp["dialogue"], dp["settings"], db, replicas=r) for r in replicas
        )
        for update_id in range(1, 6):
            replica = first if update_id % 2 else second
            await replica.feed_raw_update(bot, text_update(update_id, 7, f"сообщение {update_id}"))
        shown = session.texts_to(7)
        assert len(shown) == LIMIT + 1 and shown[-1].startswith("Слишком много сообщений")
        assert await stored_user_messages(db, 7) == LIMIT
    finally:
        for coordinator in replicas:
            await coordinator.aclose()


async def test_a_window_ends_and_a_redis_failure_lets_messages_through(redis_url):
    """A sender's window starts with their first message and its count ends with it; and
    when Redis fails the limit is not checked rather than silencing the bot."""
    from redis.asyncio import Redis

    from bot.middlewares.rate_limit import LocalWindowCounter, RedisWindowCounter

    now = [100.0]
    local = LocalWindowCounter(10, clock=lambda: now[0])
    assert [await local.hit(7) for _ in range(3)] == [1, 2, 3]
    now[0] += 9.9
    assert await local.hit(7) == 4
    now[0] += 0.1  # ten seconds after the first message
    assert await local.hit(7) == 1

    redis = Redis.from_url(redis_url)
    try:
        counter = RedisWindowCounter(redis, 0.5)
        assert [await counter.hit(7) for _ in range(3)] == [1, 2, 3]
        assert 0 < await redis.pttl("tgbot:rate:7") <= 500  # every key expires
        for _ in range(100):  # until Redis has dropped the window
            if not await redis.exists("tgbot:rate:7"):
                break
            await asyncio.sleep(0.05)
        assert await counter.hit(7) == 1
    finally:
        await redis.aclose()
    closed = Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    try:
        assert await RedisWindowCounter(closed, 60).hit(7) == 0
    finally:
        await closed.aclose()


async def test_stats_show_the_admin_how_many_messages_the_limit_dropped(limited):
    dp, bot, session, _ = limited
    for update_id in range(1, LIMIT + 3):
        await dp.feed_raw_update(bot, text_update(update_id, 7, "ещё"))
    await dp.feed_raw_update(bot, text_update(50, 9, "/stats"))  # 9: the bot's admin
    assert session.texts_to(9)[-1].endswith("сверх лимита сообщений — 2")
