"""Storage on a real SQLite file migrated by Alembic: what the bot remembers, and forgets."""

import os
import sqlite3

import pytest
from sqlalchemy import text

from bot.db import repository
from bot.db.engine import create_engine, create_sessionmaker, upgrade_to_head

BACKENDS = ["sqlite"] + (["postgres"] if os.environ.get("TEST_DATABASE_URL") else [])


@pytest.fixture(params=BACKENDS)
async def sessions(request, tmp_path):
    """A migrated database: a new SQLite file, or TEST_DATABASE_URL (Postgres) when it is set."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'nested' / 'bot.db'}"
    else:
        url = os.environ["TEST_DATABASE_URL"]
    await upgrade_to_head(url)  # creates the folder (SQLite) and the schema from nothing
    engine = create_engine(url)
    async with engine.begin() as connection:  # a shared server keeps rows between tests
        await connection.execute(text("DELETE FROM messages"))
        await connection.execute(text("DELETE FROM users"))
    yield create_sessionmaker(engine)
    await engine.dispose()


async def test_messages_come_back_oldest_first_limited_to_the_latest(sessions):
    async with sessions.begin() as session:
        user = await repository.get_or_create_user(session, 7, "Аня")
        for i in range(5):
            await repository.add_message(session, user, "user" if i % 2 == 0 else "bot", f"m{i}")
    async with sessions() as session:
        user = await repository.get_or_create_user(session, 7, "Аня")
        turns = await repository.recent_turns(session, user, 3)
    assert [t.text for t in turns] == ["m2", "m3", "m4"]
    assert [t.role for t in turns] == ["user", "bot", "user"]


async def test_history_can_be_bounded_by_a_message_id(sessions):
    async with sessions.begin() as session:
        user = await repository.get_or_create_user(session, 7, None)
        first = await repository.add_message(session, user, "user", "раз")
        await repository.add_message(session, user, "user", "два")
        turns = await repository.recent_turns(session, user, 10, up_to_id=first.id)
    assert [t.text for t in turns] == ["раз"]


async def test_reset_forgets_only_this_user(sessions):
    async with sessions.begin() as session:
        alice = await repository.get_or_create_user(session, 1, "Alice")
        bob = await repository.get_or_create_user(session, 2, "Bob")
        await repository.add_message(session, alice, "user", "секрет Алисы")
        await repository.add_message(session, bob, "user", "секрет Боба")
    async with sessions.begin() as session:
        alice = await repository.get_or_create_user(session, 1, "Alice")
        assert await repository.clear_history(session, alice) == 1
    async with sessions() as session:
        alice = await repository.get_or_create_user(session, 1, "Alice")
        bob = await repository.get_or_create_user(session, 2, "Bob")
        assert await repository.count_messages(session, alice) == 0
        assert [t.text for t in await repository.recent_turns(session, bob, 10)] == ["секрет Боба"]


async def test_temperature_is_stored_per_user(sessions):
    async with sessions.begin() as session:
        user = await repository.get_or_create_user(session, 5, None)
        await repository.set_temperature(session, user, 0.3)
    async with sessions() as session:
        assert (await repository.get_or_create_user(session, 5, None)).temperature == 0.3
        assert (await repository.get_or_create_user(session, 6, None)).temperature is None


async def test_sqlite_runs_in_wal_mode(tmp_path, sessions, request):
    if "postgres" in request.node.name:
        pytest.skip("SQLite only")
    async with sessions.begin() as session:
        await repository.get_or_create_user(session, 1, None)
    with sqlite3.connect(tmp_path / "nested" / "bot.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_retention_prunes_only_old_messages(sessions):
    from datetime import UTC, datetime, timedelta

    from bot.db.models import Message

    async with sessions.begin() as session:
        user = await repository.get_or_create_user(session, 3, None)
        old = await repository.add_message(session, user, "user", "давнее")
        await repository.add_message(session, user, "user", "свежее")
        old_row = await session.get(Message, old.id)
        old_row.created_at = datetime.now(UTC) - timedelta(days=40)
    async with sessions.begin() as session:
        assert await repository.prune_messages(session, datetime.now(UTC) - timedelta(days=30)) == 1
    async with sessions() as session:
        user = await repository.get_or_create_user(session, 3, None)
        assert [t.text for t in await repository.recent_turns(session, user, 10)] == ["свежее"]
