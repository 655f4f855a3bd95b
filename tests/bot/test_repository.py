"""Storage migrated by Alembic, on a real SQLite file and a real PostgreSQL server (the one
replicas share): what the bot remembers, and forgets."""

import asyncio
import os
import sqlite3
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from bot.db import repository
from bot.db.engine import create_engine, create_sessionmaker, upgrade_to_head

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
async def sessions(request, tmp_path):
    """A migrated database: a new SQLite file, or a new database on the session's PostgreSQL
    server (TEST_DATABASE_URL instead, when set: an operator's own server)."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'nested' / 'bot.db'}"
    else:
        url = os.environ.get("TEST_DATABASE_URL") or request.getfixturevalue("postgres_url")
    await upgrade_to_head(url)  # creates the folder (SQLite) and the schema from nothing
    engine = create_engine(url)
    async with engine.begin() as connection:  # a shared server keeps rows between tests
        await connection.execute(text("DELETE FROM user_facts"))
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


async def test_history_is_in_conversation_order_whatever_order_replies_were_stored(sessions):
    """A user wrote twice before the first reply was stored (rows u1 u2 b1 b2): the history is
    the conversation u1 b1 u2 b2, and the reply to u2 sees b1 but not its own answer."""
    async with sessions.begin() as session:
        user = await repository.get_or_create_user(session, 7, None)
        u1 = await repository.add_message(session, user, "user", "u1", telegram_message_id=1)
        u2 = await repository.add_message(session, user, "user", "u2", telegram_message_id=2)
        await repository.add_message(session, user, "bot", "b1", reply_to_id=u1.id)
        await repository.add_message(session, user, "bot", "b2", reply_to_id=u2.id)
        everything = await repository.recent_turns(session, user, 10)
        for_u2 = await repository.recent_turns(session, user, 10, up_to_id=u2.id)
        last_two = await repository.recent_turns(session, user, 2)
    assert [t.text for t in everything] == ["u1", "b1", "u2", "b2"]
    assert [t.text for t in for_u2] == ["u1", "b1", "u2"]
    assert [t.text for t in last_two] == ["u2", "b2"]


async def test_a_telegram_message_is_stored_once(sessions):
    from sqlalchemy.exc import IntegrityError

    async with sessions.begin() as session:
        user = await repository.get_or_create_user(session, 7, None)
        await repository.add_message(session, user, "user", "раз", telegram_message_id=5)
    with pytest.raises(IntegrityError):
        async with sessions.begin() as session:
            user = await repository.get_or_create_user(session, 7, None)
            await repository.add_message(session, user, "user", "раз", telegram_message_id=5)
    async with sessions.begin() as session:  # another chat may have the same message id
        other = await repository.get_or_create_user(session, 8, None)
        await repository.add_message(session, other, "user", "два", telegram_message_id=5)
        user = await repository.get_or_create_user(session, 7, None)
        assert await repository.has_telegram_message(session, user, 5)
        assert not await repository.has_telegram_message(session, user, 6)
        assert await repository.count_messages(session, user) == 1


async def test_unanswered_lists_recent_telegram_messages_without_a_reply(sessions):
    from datetime import UTC, datetime, timedelta

    async with sessions.begin() as session:
        alice = await repository.get_or_create_user(session, 1, "Alice")
        bob = await repository.get_or_create_user(session, 2, "Bob")
        old = await repository.add_message(session, alice, "user", "old", telegram_message_id=1)
        old.created_at = datetime.now(UTC) - timedelta(hours=1)
        answered = await repository.add_message(session, alice, "user", "a", telegram_message_id=2)
        await repository.add_message(session, alice, "bot", "reply", reply_to_id=answered.id)
        lost = await repository.add_message(session, bob, "user", "b", telegram_message_id=3)
        await repository.add_message(session, alice, "user", "console")  # not from Telegram
        lost_too = await repository.add_message(session, alice, "user", "c", telegram_message_id=4)
    async with sessions() as session:
        pending = await repository.unanswered_messages(
            session, datetime.now(UTC) - timedelta(minutes=10)
        )
    assert [(p.message_id, p.telegram_id) for p in pending] == [(lost.id, 2), (lost_too.id, 1)]


async def test_an_owed_message_brings_the_message_its_reply_was_streamed_into(sessions):
    """What a restart or a surviving replica needs to finish a cut reply in place: the draft's
    Telegram id comes back with the owed message, on both backends; a settled message is owed
    no more."""
    from datetime import UTC, datetime, timedelta

    async with sessions.begin() as session:
        alice = await repository.get_or_create_user(session, 1, "Alice")
        cut = await repository.add_message(session, alice, "user", "a", telegram_message_id=2)
        untouched = await repository.add_message(session, alice, "user", "b", telegram_message_id=3)
    big_id = 2**40  # a Telegram id past 32 bits
    async with sessions.begin() as session:
        await repository.set_reply_draft(session, cut.id, big_id)
    since = datetime.now(UTC) - timedelta(minutes=10)
    async with sessions() as session:
        pending = await repository.unanswered_messages(session, since)
    assert [(p.message_id, p.draft_id) for p in pending] == [(cut.id, big_id), (untouched.id, None)]
    async with sessions() as session:  # whether a reply to it should quote it
        assert await repository.wrote_after(session, cut.id)
        assert not await repository.wrote_after(session, untouched.id)
    async with sessions.begin() as session:  # given up (a notice sent instead): owed no more
        await repository.settle(session, cut.id, datetime.now(UTC))
    async with sessions() as session:
        pending = await repository.unanswered_messages(session, since)
    assert [(p.message_id, p.draft_id) for p in pending] == [(untouched.id, None)]


async def test_a_stored_reset_bounds_history_until_carried_out_and_then_deletes_before_it(
    sessions,
):
    """Replicas store /reset in line (u1 u2 RESET u3, replies stored late): a reply to u2 still
    sees u1, a reply to u3 sees nothing before the reset, and carrying it out deletes exactly
    what came before it, replies stored after it included."""
    from datetime import UTC, datetime, timedelta

    async with sessions.begin() as session:
        user = await repository.get_or_create_user(session, 7, None)
        u1 = await repository.add_message(session, user, "user", "u1", telegram_message_id=1)
        u2 = await repository.add_message(session, user, "user", "u2", telegram_message_id=2)
        mark = await repository.add_message(
            session, user, repository.RESET_ROLE, "/reset", telegram_message_id=3
        )
        u3 = await repository.add_message(session, user, "user", "u3", telegram_message_id=4)
        await repository.add_message(session, user, "bot", "b1", reply_to_id=u1.id)
    async with sessions() as session:
        user = await repository.get_or_create_user(session, 7, None)
        for_u2 = await repository.recent_turns(session, user, 10, up_to_id=u2.id)
        for_u3 = await repository.recent_turns(session, user, 10, up_to_id=u3.id)
        owed = await repository.unanswered_messages(
            session, datetime.now(UTC) - timedelta(minutes=1), telegram_id=7
        )
    assert [t.text for t in for_u2] == ["u1", "b1", "u2"]
    assert [t.text for t in for_u3] == ["u3"]
    # the reset is owed in its place, between the messages it separates
    assert [(p.message_id, p.role) for p in owed] == [
        (u2.id, "user"),
        (mark.id, "reset"),
        (u3.id, "user"),
    ]
    async with sessions.begin() as session:
        user = await repository.get_or_create_user(session, 7, None)
        await repository.add_message(session, user, "bot", "b2", reply_to_id=u2.id)
        assert await repository.carry_out_marker(session, user, mark.id, "reset") == 5
    async with sessions() as session:
        user = await repository.get_or_create_user(session, 7, None)
        assert [t.text for t in await repository.recent_turns(session, user, 10)] == ["u3"]
        owed = await repository.unanswered_messages(session, datetime.now(UTC), telegram_id=7)
    assert owed == []  # carried out, and u3 is older than "now": nothing left


async def test_a_stored_forget_removes_the_user_unless_they_wrote_after_it(sessions):
    async with sessions.begin() as session:
        alone = await repository.get_or_create_user(session, 1, "Alice")
        await repository.set_temperature(session, alone, 1.2)
        await repository.add_message(session, alone, "user", "a", telegram_message_id=1)
        gone = await repository.add_message(
            session, alone, "forget", "/forget", telegram_message_id=2
        )
        talker = await repository.get_or_create_user(session, 2, "Bob")
        await repository.set_temperature(session, talker, 1.2)
        await repository.add_message(session, talker, "user", "b", telegram_message_id=1)
        kept = await repository.add_message(
            session, talker, "forget", "/forget", telegram_message_id=2
        )
        await repository.add_message(session, talker, "user", "after", telegram_message_id=3)
    async with sessions.begin() as session:
        alone = await repository.get_or_create_user(session, 1, "Alice")
        talker = await repository.get_or_create_user(session, 2, "Bob")
        await repository.carry_out_marker(session, alone, gone.id, "forget")
        await repository.carry_out_marker(session, talker, kept.id, "forget")
    async with sessions() as session:
        users = {u for (u,) in (await session.execute(text("SELECT telegram_id FROM users")))}
        bob = await repository.get_or_create_user(session, 2, "Bob")
        assert [t.text for t in await repository.recent_turns(session, bob, 10)] == ["after"]
        assert bob.temperature is None
    assert users == {2}


async def test_migrating_old_rows_links_each_reply_to_its_message(tmp_path):
    """Rows from before the delivery-state migration are not taken for unanswered messages."""
    from alembic import command
    from bot.db.engine import _alembic_config

    db = tmp_path / "old.db"
    url = f"sqlite+aiosqlite:///{db}"
    await asyncio.to_thread(command.upgrade, _alembic_config(url), "0001")
    with sqlite3.connect(db) as connection:
        connection.execute(
            "INSERT INTO users (id, telegram_id, created_at) VALUES (1, 7, '2026-01-01')"
        )
        for role, text in [("user", "u1"), ("bot", "b1"), ("user", "u2"), ("user", "u3")]:
            connection.execute(
                "INSERT INTO messages (user_id, role, text, created_at) "
                "VALUES (1, ?, ?, '2026-01-01')",
                (role, text),
            )
        connection.execute(
            "INSERT INTO messages (user_id, role, text, created_at) "
            "VALUES (1, 'bot', 'b3', '2026-01-01')"
        )
    await upgrade_to_head(url)
    with sqlite3.connect(db) as connection:
        links = connection.execute(
            "SELECT m.text, u.text FROM messages m JOIN messages u ON u.id = m.reply_to_id"
        ).fetchall()
    assert links == [("b1", "u1"), ("b3", "u3")]


async def test_a_message_keeps_one_reply_whoever_stores_a_second(sessions, tiny_model_dir):
    """With replicas, one that stalled past its lease just after checking it could store its
    reply after another replica had answered the same message. Before: both were stored, and
    every later prompt carried the two answers."""
    from bot.config import Settings
    from bot.dialogue import DialogueService, UserRef
    from bot.engine import GenerationEngine, load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    backend = GenerationEngine(model, tokenizer, persona=None, reply_tokens=8)
    dialogue = DialogueService(sessions, backend, Settings(_env_file=None))
    alice = UserRef(7, "Alice")
    message_id = await dialogue.remember_user_message(alice, "Привет", 1)
    assert message_id is not None
    assert await dialogue.store_reply(alice, "Ответ первой реплики", message_id)
    assert not await dialogue.store_reply(alice, "Ответ опоздавшей реплики", message_id)
    async with sessions() as session:
        user = await repository.get_or_create_user(session, 7, None)
        turns = await repository.recent_turns(session, user, 10)
    assert [t.text for t in turns] == ["Привет", "Ответ первой реплики"]
    with pytest.raises(IntegrityError):  # any other refusal is still an error
        await dialogue.store_reply(alice, "Ответ", message_id + 1000)


async def test_a_reply_is_stored_though_the_pooled_connection_stopped_answering(
    postgres_url, tiny_model_dir
):
    """The reply reached the user; then the database stops answering on the pooled connection
    (a failover). Before: storing it failed (no retry), and the reply was missing from the
    history until the next start answered the message again."""
    from bot.config import Settings
    from bot.dialogue import DialogueService, UserRef
    from bot.engine import GenerationEngine, load_model
    from tests.servers import silenced_connections

    await upgrade_to_head(postgres_url)
    engine = create_engine(postgres_url, timeout_s=1)
    model, tokenizer = load_model(str(tiny_model_dir))
    backend = GenerationEngine(model, tokenizer, persona=None, reply_tokens=8)
    dialogue = DialogueService(create_sessionmaker(engine), backend, Settings(_env_file=None))
    alice = UserRef(7, "Alice")
    message_id = await dialogue.remember_user_message(alice, "Привет", 1)
    assert message_id is not None
    async with silenced_connections(postgres_url.replace("+asyncpg", "")) as stopped:
        assert stopped
        assert await asyncio.wait_for(dialogue.store_reply(alice, "Ответ", message_id), 30)
    async with create_sessionmaker(engine)() as session:
        user = await repository.get_or_create_user(session, 7, None)
        turns = await repository.recent_turns(session, user, 10)
    await engine.dispose()
    assert [t.text for t in turns] == ["Привет", "Ответ"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_migrating_a_message_stored_with_two_replies_keeps_the_first_linked(
    backend, tmp_path, request
):
    """Rows from before migration 0007 may hold two replies to one message: the first stays
    its reply, the second stays in the history as sent, linked to nothing."""
    from alembic import command
    from bot.db.engine import _alembic_config

    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    await asyncio.to_thread(command.upgrade, _alembic_config(url), "0006")
    old = datetime(2026, 1, 1, tzinfo=UTC)
    engine = create_engine(url)
    async with engine.begin() as connection:
        await connection.execute(
            text("INSERT INTO users (id, telegram_id, created_at) VALUES (1, 7, :t)"),
            {"t": old},
        )
        for id_, role, body, reply_to in [
            (1, "user", "u1", None),
            (2, "bot", "b1", 1),
            (3, "bot", "b1 again", 1),
            (4, "user", "u2", None),
            (5, "bot", "b2", 4),
        ]:
            await connection.execute(
                text(
                    "INSERT INTO messages (id, user_id, role, text, reply_to_id, created_at) "
                    "VALUES (:id, 1, :role, :body, :reply_to, :t)"
                ),
                {"id": id_, "role": role, "body": body, "reply_to": reply_to, "t": old},
            )
    await engine.dispose()
    await upgrade_to_head(url)
    engine = create_engine(url)
    async with engine.connect() as connection:
        rows = (
            await connection.execute(text("SELECT text, reply_to_id FROM messages ORDER BY id"))
        ).all()
    await engine.dispose()
    assert [tuple(row) for row in rows] == [
        ("u1", None),
        ("b1", 1),
        ("b1 again", None),
        ("u2", None),
        ("b2", 4),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_migrations_build_exactly_the_models_schema(backend, tmp_path, request):
    """A model changed without a migration (or the reverse) would pass every other test on a
    fresh database and break an operator's upgrade: Alembic's own comparison finds it."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from bot.db.models import Base

    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'schema.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    await upgrade_to_head(url)
    engine = create_engine(url)

    def differences(connection):  # type: ignore[no-untyped-def]
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)

    async with engine.connect() as connection:
        diff = await connection.run_sync(differences)
    await engine.dispose()
    assert diff == []


async def test_a_chat_moved_to_a_new_id_joins_a_row_someone_made_there_first(sessions):
    """A group upgraded to a supergroup: someone wrote in the supergroup before its memory was
    moved. The old history comes first, the settings fill only what the new row lacks, and
    the old Telegram ids no longer count (they could clash with the supergroup's)."""
    async with sessions.begin() as session:
        old = await repository.get_or_create_user(session, -5001, "Группа")
        await repository.set_temperature(session, old, 0.4)
        await repository.add_message(session, old, "user", "старое", telegram_message_id=7)
        new = await repository.get_or_create_user(session, -1005001, "Группа")
        await repository.add_message(session, new, "user", "новое", telegram_message_id=3)
    async with sessions.begin() as session:
        assert await repository.move_chat(session, -5001, -1005001)
        assert not await repository.move_chat(session, -9999, -1005001)  # nothing stored there
    async with sessions() as session:
        new = await repository.get_or_create_user(session, -1005001, None)
        turns = await repository.recent_turns(session, new, 10)
        assert [t.text for t in turns] == ["старое", "новое"]
        assert new.temperature == 0.4
        assert not await repository.has_telegram_message(session, new, 7)
        assert await repository.has_telegram_message(session, new, 3)
        assert await repository.totals(session) == (1, 2)


async def test_a_database_that_cannot_be_opened_is_one_line_without_the_password(postgres_url):
    """Before: a traceback (ConnectionRefusedError, InvalidCatalogNameError...) at start."""
    from sqlalchemy.engine import make_url

    from bot.app import open_database
    from bot.config import ConfigError, Settings

    server = make_url(postgres_url).set(password="s3cret-pw")
    as_hosts_write_it = server.render_as_string(hide_password=False).replace(
        "postgresql+asyncpg://", "postgres://"
    )
    engine = await open_database(
        Settings(_env_file=None, database_url=as_hosts_write_it).database_url
    )
    await engine.dispose()  # the host's own URL form works
    missing = server.set(database="no_such_database").render_as_string(hide_password=False)
    closed = server.set(port=1).render_as_string(hide_password=False)
    for url, cause in ((missing, "does not exist"), (closed, "ConnectionRefusedError")):
        with pytest.raises(ConfigError) as refused:
            await open_database(url)
        line = str(refused.value)
        assert line.startswith("cannot open the database at DATABASE_URL=postgresql+asyncpg://")
        assert cause in line and "s3cret-pw" not in line and "\n" not in line, line


async def test_each_forum_topic_has_its_own_conversation(sessions):
    """A forum group's topics talk about different things: a reply sees its own topic's
    messages and the replies to them, not the other topics' (nor the General topic's)."""
    async with sessions.begin() as session:
        group = await repository.get_or_create_user(session, -100500, "Форум")
        cats = await repository.add_message(
            session, group, "user", "про кошек", telegram_message_id=1, telegram_thread_id=5
        )
        await repository.add_message(session, group, "user", "общий вопрос", telegram_message_id=2)
        await repository.add_message(session, group, "bot", "мяу", reply_to_id=cats.id)
        await repository.add_message(
            session, group, "user", "про собак", telegram_message_id=3, telegram_thread_id=9
        )
        again = await repository.add_message(
            session, group, "user", "ещё о кошках", telegram_message_id=4, telegram_thread_id=5
        )
    async with sessions() as session:
        group = await repository.get_or_create_user(session, -100500, None)
        in_cats = await repository.recent_turns(session, group, 10, up_to_id=again.id, thread_id=5)
        in_dogs = await repository.recent_turns(session, group, 10, thread_id=9)
        in_general = await repository.recent_turns(session, group, 10)
    assert [t.text for t in in_cats] == ["про кошек", "мяу", "ещё о кошках"]
    assert [t.text for t in in_dogs] == ["про собак"]
    assert [t.text for t in in_general] == ["общий вопрос"]


async def test_stats_count_dialogue_messages_not_commands_waiting_in_line(sessions):
    async with sessions.begin() as session:
        user = await repository.get_or_create_user(session, 7, "Аня")
        await repository.add_message(session, user, "user", "привет", telegram_message_id=1)
        await repository.add_message(session, user, "bot", "здравствуйте")
        reset = repository.RESET_ROLE
        await repository.add_message(session, user, reset, "", telegram_message_id=2)
    async with sessions() as session:
        assert await repository.totals(session) == (1, 2)


async def test_an_edit_changes_only_that_chats_message(sessions):
    """Telegram message ids repeat across chats: an edit in one chat leaves another's alone."""
    async with sessions.begin() as session:
        alice = await repository.get_or_create_user(session, 7, None)
        bob = await repository.get_or_create_user(session, 8, None)
        await repository.add_message(session, alice, "user", "Вася", telegram_message_id=5)
        await repository.add_message(session, bob, "user", "Коля", telegram_message_id=5)
    async with sessions.begin() as session:
        assert await repository.edit_user_message(session, 7, 5, "Петя") is not None
        assert await repository.edit_user_message(session, 7, 6, "нет такого") is None
        assert await repository.edit_user_message(session, 9, 5, "нет такого чата") is None
    async with sessions() as session:
        alice = await repository.get_or_create_user(session, 7, None)
        bob = await repository.get_or_create_user(session, 8, None)
        assert [t.text for t in await repository.recent_turns(session, alice, 10)] == ["Петя"]
        assert [t.text for t in await repository.recent_turns(session, bob, 10)] == ["Коля"]


async def _forum(session) -> dict[str, int]:
    """A forum group talking in topic 5 (cats), topic 9 (dogs) and General; each message
    answered. Returns the row ids by text."""
    group = await repository.get_or_create_user(session, -100500, "Форум")
    ids = {}
    for number, (text_, topic) in enumerate(
        (("про кошек", 5), ("про собак", 9), ("общий вопрос", None)), start=1
    ):
        asked = await repository.add_message(
            session, group, "user", text_, telegram_message_id=number, telegram_thread_id=topic
        )
        await repository.add_message(session, group, "bot", f"ответ: {text_}", reply_to_id=asked.id)
        ids[text_] = asked.id
    return ids


async def test_a_reset_in_a_forum_topic_forgets_that_topic_only(sessions):
    """Before, /reset in one topic wiped every topic's conversation (and General's)."""
    async with sessions.begin() as session:
        await _forum(session)
    async with sessions.begin() as session:
        group = await repository.get_or_create_user(session, -100500, None)
        assert await repository.clear_history(session, group, 5) == 2
    async with sessions() as session:
        group = await repository.get_or_create_user(session, -100500, None)
        assert await repository.recent_turns(session, group, 10, thread_id=5) == []
        assert [t.text for t in await repository.recent_turns(session, group, 10, thread_id=9)] == [
            "про собак",
            "ответ: про собак",
        ]
        assert len(await repository.recent_turns(session, group, 10)) == 2  # General's


async def test_a_stored_reset_bounds_and_deletes_its_own_topic_and_a_forget_all(sessions):
    """With replicas /reset waits in line as a marker: it hides its topic's history before it
    from the next replies, other topics' not; carried out, it deletes only its topic's rows.
    A /forget marker, in any topic, ends every topic's conversation."""
    async with sessions.begin() as session:
        await _forum(session)
        group = await repository.get_or_create_user(session, -100500, None)
        mark = await repository.add_message(
            session, group, "reset", "/reset", telegram_message_id=4, telegram_thread_id=5
        )
        later = {}
        for number, topic in ((5, 5), (6, 9)):
            later[topic] = await repository.add_message(
                session,
                group,
                "user",
                "и снова",
                telegram_message_id=number,
                telegram_thread_id=topic,
            )
    async with sessions() as session:
        group = await repository.get_or_create_user(session, -100500, None)
        cats = await repository.recent_turns(session, group, 10, up_to_id=later[5].id, thread_id=5)
        dogs = await repository.recent_turns(session, group, 10, up_to_id=later[9].id, thread_id=9)
    assert [t.text for t in cats] == ["и снова"]
    assert [t.text for t in dogs] == ["про собак", "ответ: про собак", "и снова"]
    async with sessions.begin() as session:
        group = await repository.get_or_create_user(session, -100500, None)
        assert await repository.carry_out_marker(session, group, mark.id, "reset") == 3
        assert await repository.count_messages(session, group) == 6  # dogs', General's, 2 new
        forget = await repository.add_message(
            session, group, "forget", "/forget", telegram_message_id=7, telegram_thread_id=9
        )
        await repository.add_message(
            session, group, "user", "что помнишь?", telegram_message_id=8, telegram_thread_id=5
        )
    async with sessions() as session:
        group = await repository.get_or_create_user(session, -100500, None)
        assert [t.text for t in await repository.recent_turns(session, group, 10, thread_id=5)] == [
            "что помнишь?"
        ]
        assert await repository.recent_turns(session, group, 10) == []
    async with sessions.begin() as session:
        group = await repository.get_or_create_user(session, -100500, None)
        await repository.carry_out_marker(session, group, forget.id, "forget")
        assert await repository.count_messages(session, group) == 1


async def test_a_newer_fact_supersedes_and_forgetting_is_scoped_to_its_user(sessions):
    """One value per kind, the newest statement's; a fact id of another user's deletes nothing;
    /forget takes the facts with everything else (both backends)."""
    async with sessions.begin() as session:
        anya = await repository.get_or_create_user(session, 7, "Аня")
        borya = await repository.get_or_create_user(session, 8, "Боря")
        first = await repository.add_message(session, anya, "user", "я живу в Казани")
        await repository.remember_facts(session, anya, [("city", "Казань")], first.id)
        moved = await repository.add_message(session, anya, "user", "я переехала в Тверь")
        changed = await repository.remember_facts(
            session, anya, [("city", "Тверь"), ("name", "Аня")], moved.id
        )
        said = await repository.add_message(session, borya, "user", "я живу в Казани")
        await repository.remember_facts(session, borya, [("city", "Казань")], said.id)
    assert changed == 2
    async with sessions.begin() as session:
        anya = await repository.get_or_create_user(session, 7, "Аня")
        facts = await repository.user_facts(session, anya)
        assert [(f.kind, f.value, f.message_id) for f in facts] == [
            ("city", "Тверь", moved.id),
            ("name", "Аня", moved.id),
        ]
        assert not await repository.forget_fact(session, 8, facts[0].id)  # not Боря's
        assert await repository.forget_fact(session, 7, facts[0].id)
        assert [f.kind for f in await repository.user_facts(session, anya)] == ["name"]
        assert await repository.delete_user(session, 7)
    async with sessions() as session:
        count = await session.scalar(text("SELECT count(*) FROM user_facts"))
        borya = await repository.get_or_create_user(session, 8, "Боря")
        assert [f.value for f in await repository.user_facts(session, borya)] == ["Казань"]
    assert count == 1


async def test_a_new_user_created_by_two_requests_at_once_is_one_row(sessions):
    """A user's first Telegram message and their first page request (or two replicas) create
    the user at the same moment: both get the one row. The second used to fail on the unique
    id, and its Telegram update was lost (seen with the Mini App beside replicas)."""
    started = asyncio.Event()

    async def create() -> int:
        async with sessions.begin() as session:
            await started.wait()
            return (await repository.get_or_create_user(session, 777, "Новая")).id

    tasks = [asyncio.create_task(create()) for _ in range(4)]
    await asyncio.sleep(0)
    started.set()
    ids = await asyncio.gather(*tasks)
    assert len(set(ids)) == 1
    async with sessions() as session:
        count = await session.scalar(text("SELECT count(*) FROM users WHERE telegram_id = 777"))
    assert count == 1


async def test_a_message_is_stored_with_its_authors_settings_in_one_statement(sessions):
    """The store a message's life starts with: no row for a first-time user (they are created,
    then it is stored), and for a known one the message with their /temp and /memory, as the
    database holds them at that moment."""
    async with sessions.begin() as session:
        assert await repository.add_message_from(session, 41, "user", "привет") is None
        user = await repository.get_or_create_user(session, 41, "Аня")
        await repository.set_temperature(session, user, 0.4)
        await repository.set_memory_enabled(session, user, False)
        added = await repository.add_message_from(
            session, 41, "user", "как дела?", telegram_message_id=9, telegram_thread_id=3
        )
    assert added is not None
    assert (added.user_id, added.temperature, added.memory_enabled, added.name) == (
        user.id,
        0.4,
        False,
        "Аня",
    )
    async with sessions() as session:
        turns = await repository.recent_turns(session, user, 10, thread_id=3)
        assert [t.text for t in turns] == ["как дела?"]
        assert await repository.stored_message_id(session, user, 9) == added.id
    async with sessions.begin() as session:  # memory off: nothing indexed
        quiet = await repository.add_message_from(session, 41, "user", "кот", terms=["кот"])
        row = await repository.get_or_create_user(session, 41, "Аня")
        await repository.set_memory_enabled(session, row, True)
        told = await repository.add_message_from(
            session, 41, "user", "моя кошка Мурка", terms=["кошка", "мурка"]
        )
    async with sessions() as session:
        hits = await repository.term_hits(session, user, ["кот", "кошка", "мурка"], 10**9)
    assert quiet is not None and told is not None and told.memory_enabled
    assert hits.hits == {told.id: {"кошка", "мурка"}}
    with pytest.raises(IntegrityError):  # the same Telegram message again
        async with sessions.begin() as session:
            await repository.add_message_from(
                session, 41, "user", "как дела?", telegram_message_id=9
            )


async def test_a_message_is_found_by_each_of_its_index_words(sessions):
    """Index words go in as one statement from a JSON array on either database: each word,
    Cyrillic included, is found again for its user only."""
    async with sessions.begin() as session:
        anya = await repository.get_or_create_user(session, 1, "Аня")
        other = await repository.get_or_create_user(session, 2, "Боря")
        mine = await repository.add_message(session, anya, "user", "моя кошка Мурка")
        theirs = await repository.add_message(session, other, "user", "кошка")
        await repository.index_terms(session, anya, mine.id, ["кошка", "мурка", "ё" * 60])
        await repository.index_terms(session, other, theirs.id, ["кошка"])
        await repository.index_terms(session, anya, mine.id, [])  # nothing to index
    async with sessions() as session:
        hits = await repository.term_hits(session, anya, ["кошка", "мурка", "ё" * 48], 10**9)
    assert hits.hits == {mine.id: {"кошка", "мурка", "ё" * 48}}
    assert hits.df == {"кошка": 1, "мурка": 1, "ё" * 48: 1}


async def test_sqlite_syncs_each_commit_to_disk_only_when_told(tmp_path, monkeypatch):
    """SQLITE_SYNCHRONOUS reaches every connection the bot opens (NORMAL by default, FULL when
    the operator wants each message on disk before it is answered); anything else is refused
    with the setting's name, not applied."""
    from pydantic import ValidationError

    from bot.app import open_database
    from bot.config import Settings

    modes = {}
    for value in (None, "full", "NORMAL"):
        if value is None:
            monkeypatch.delenv("SQLITE_SYNCHRONOUS", raising=False)
        else:
            monkeypatch.setenv("SQLITE_SYNCHRONOUS", value)
        settings = Settings(_env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path}/b.db")
        engine = await open_database(
            settings.database_url, settings.database_timeout_s, settings.sqlite_synchronous
        )
        async with engine.connect() as connection:
            modes[value] = (await connection.execute(text("PRAGMA synchronous"))).scalar()
        await engine.dispose()
    assert modes == {None: 1, "full": 2, "NORMAL": 1}  # SQLite's numbers: NORMAL 1, FULL 2
    monkeypatch.setenv("SQLITE_SYNCHRONOUS", "OFF")
    with pytest.raises(ValidationError, match="sqlite_synchronous"):
        Settings(_env_file=None)


async def test_on_postgresql_a_message_without_facts_costs_no_begin_and_commit(
    postgres_url, tiny_model_dir, monkeypatch
):
    """A new message (with its index words) is one statement on PostgreSQL: it commits by
    itself, two round trips fewer than in a transaction. A message that states a fact is stored
    with it all or nothing, in a transaction. Before: every message paid BEGIN and COMMIT."""
    import asyncpg

    from bot.config import Settings
    from bot.dialogue import DialogueService, UserRef
    from bot.engine import GenerationEngine, load_model

    await upgrade_to_head(postgres_url)
    engine = create_engine(postgres_url)
    model, tokenizer = load_model(str(tiny_model_dir))
    backend = GenerationEngine(model, tokenizer, persona=None, reply_tokens=8)
    dialogue = DialogueService(create_sessionmaker(engine), backend, Settings(_env_file=None))
    alice = UserRef(8101, "Alice")
    assert await dialogue.remember_user_message(alice, "Привет", 1) is not None  # her row
    sent: list[str] = []  # what the driver sends as plain commands (BEGIN, COMMIT, ...)
    execute = asyncpg.Connection.execute

    async def noting(self, query, *args, **kwargs):  # type: ignore[no-untyped-def]
        sent.append(query.split()[0].rstrip(";").upper())
        return await execute(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "execute", noting)
    try:
        plain = await dialogue.store_user_message(alice, "Мы гуляли в парке у реки", 2)
        assert "COMMIT" not in sent, sent
        told = await dialogue.store_user_message(alice, "Меня зовут Аня", 3)
        assert sent.count("COMMIT") == 1, sent
    finally:
        monkeypatch.undo()
    async with create_sessionmaker(engine)() as session:
        user = await repository.get_or_create_user(session, 8101, None)
        turns = await repository.recent_turns(session, user, 10)
        hits = await repository.term_hits(session, user, ["река"], 10**9)
        facts = await repository.user_facts(session, user)
    await engine.dispose()
    assert plain is not None and told is not None
    assert [t.text for t in turns] == ["Привет", "Мы гуляли в парке у реки", "Меня зовут Аня"]
    assert hits.hits == {plain.message_id: {"река"}}  # its index words came with it
    assert [(f.kind, f.value) for f in facts] == [("name", "Аня")]
