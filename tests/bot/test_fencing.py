"""Fencing tokens (bot.replicas): a replica whose lease Redis forgot acts no more for the user.

Real Redis, real database (SQLite and PostgreSQL), the real dispatcher and model; only the Bot
API's HTTP is recorded.
"""

from dataclasses import dataclass
from typing import Any

import pytest

from bot.dialogue import UserRef
from bot.middlewares.lease_fence import LeaseFenceMiddleware
from bot.replicas import LeaseLost, ReplicaCoordinator
from tests.bot.recording_session import in_process_bot


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    return request.getfixturevalue("postgres_url")


@dataclass
class TwoReplicas:
    """One bot's services (Bot API calls fenced, as in the app) and two replicas' leases."""

    dialogue: Any
    bot: Any
    session: Any
    first: ReplicaCoordinator
    second: ReplicaCoordinator


@pytest.fixture
async def two_replicas(database_url, tiny_model_dir, redis_url):
    dp, bot, session, db = await in_process_bot(database_url, tiny_model_dir)
    session.middleware(LeaseFenceMiddleware())
    dialogue = dp["dialogue"]
    first, second = [
        await ReplicaCoordinator.connect(redis_url, lease_s=30, wait_s=5, fence=dialogue)
        for _ in range(2)
    ]
    try:
        yield TwoReplicas(dialogue, bot, session, first, second)
    finally:
        await first.aclose()
        await second.aclose()
        dialogue.backend.close()
        await db.dispose()


async def test_a_replica_whose_lease_redis_forgot_neither_sends_nor_stores(two_replicas):
    """Redis loses its data (a restart) while a replica streams a reply, and another replica
    is granted the user's lease: the first, its own deadline still far off, stops before its
    next Bot API call and stores neither the reply nor its draft. Without fencing tokens it
    went on (the deadline on its own clock was all it checked), and the user got the reply
    twice."""
    r = two_replicas
    dialogue, bot, session, first, second = r.dialogue, r.bot, r.session, r.first, r.second
    user = UserRef(7001, "Аня")
    message_id = await dialogue.remember_user_message(user, "Привет!", 101)
    async with first.lease(user.telegram_id) as held:
        assert held is not None
        await bot.send_message(user.telegram_id, "Первые слова")  # the holder may
        await first.redis.flushall()  # Redis restarted empty: the lock is forgotten
        async with second.lease(user.telegram_id, wait=False) as taken:
            assert taken is not None and taken.token > held.token
        with pytest.raises(LeaseLost, match="fencing token"):
            await bot.send_message(user.telegram_id, "Первые слова и ещё")
        with pytest.raises(LeaseLost):
            await dialogue.store_reply(user, "Ответ", message_id)
    assert session.texts_to(user.telegram_id) == ["Первые слова"]
    [owed] = await dialogue.unanswered(600)  # still owed, to the new holder
    assert owed.message_id == message_id and owed.draft_id is None
    async with second.lease(user.telegram_id, wait=False) as newest:  # the newest acts
        assert newest is not None
        await bot.send_message(user.telegram_id, "Ответ")
        assert await dialogue.store_reply(user, "Ответ", message_id)
    assert await dialogue.unanswered(600) == []


async def test_a_message_sent_as_the_lease_changed_hands_is_continued_not_doubled(two_replicas):
    """A replica's message reached the chat while its lease went to another: the id is still
    noted where none is (the holder then writes its reply into that message instead of
    leaving it beside its own, an orphan), but never over a message the holder noted."""
    r = two_replicas
    dialogue, first, second = r.dialogue, r.first, r.second
    user = UserRef(7003, "Аня")
    early = await dialogue.remember_user_message(user, "Привет!", 101)
    late = await dialogue.remember_user_message(user, "Как дела?", 102)
    async with first.lease(user.telegram_id) as held:
        assert held is not None
        await first.redis.flushall()
        async with second.lease(user.telegram_id, wait=False) as taken:
            assert taken is not None
            await dialogue.remember_draft(late, 777)  # the holder's own message
        with pytest.raises(LeaseLost):
            await dialogue.remember_draft(early, 555)
        with pytest.raises(LeaseLost):
            await dialogue.remember_draft(late, 556)
    drafts = {m.message_id: m.draft_id for m in await dialogue.unanswered(600)}
    assert drafts == {early: 555, late: 777}
