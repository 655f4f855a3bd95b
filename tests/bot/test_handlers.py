"""Handlers run in-process through the real dispatcher, with a database that can fail."""

import contextlib
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from bot import texts
from tests.bot.recording_session import in_process_bot, text_update


@pytest.fixture
async def wired(tmp_path, tiny_model_dir):
    dp, bot, session, db = await in_process_bot(
        f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", tiny_model_dir
    )
    yield dp, bot, session, db
    dp["dialogue"].backend.close()
    await db.dispose()


@contextlib.contextmanager
def prompts_seen(backend) -> Iterator[list[str]]:
    """The real engine, each prompt it is given noted (its turns, one per line)."""
    prompts: list[str] = []
    generate = backend.generate

    async def seen(turns, *args, **kwargs):
        prompts.append("\n".join(turns))
        return await generate(turns, *args, **kwargs)

    backend.generate = seen
    try:
        yield prompts
    finally:
        backend.generate = generate


def forum_update(update_id: int, topic: int, text_: str, user_id: int = 11) -> dict:
    """A message in topic ``topic`` of a forum supergroup (-100500)."""
    message = {
        "message_id": update_id,
        "message_thread_id": topic,
        "is_topic_message": True,
        "date": int(time.time()),
        "chat": {"id": -100500, "type": "supergroup", "title": "Форум", "is_forum": True},
        "from": {"id": user_id, "is_bot": False, "first_name": "Аня"},
        "text": text_,
    }
    if text_.startswith("/"):
        message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text_)}]
    return {"update_id": update_id, "message": message}


async def test_a_failing_handler_apologises_and_the_bot_keeps_working(wired):
    dp, bot, session, db = wired
    await dp.feed_raw_update(bot, text_update(1, 7, "Привет"))
    assert len(session.texts_to(7)) == 1
    async with db.begin() as connection:  # the storage breaks under the bot
        await connection.execute(text("ALTER TABLE messages RENAME TO messages_gone"))
    await dp.feed_raw_update(bot, text_update(2, 7, "Как дела?"))
    assert session.texts_to(7)[-1] == texts.ERROR
    async with db.begin() as connection:  # and comes back
        await connection.execute(text("ALTER TABLE messages_gone RENAME TO messages"))
    await dp.feed_raw_update(bot, text_update(3, 7, "Ты тут?"))
    assert session.texts_to(7)[-1] != texts.ERROR
    assert len(session.texts_to(7)) == 3


async def test_help_lists_every_command(wired):
    dp, bot, session, _ = wired
    await dp.feed_raw_update(bot, text_update(1, 9, "/help"))
    reply = session.texts_to(9)[0]
    for command in ("/start", "/help", "/reset", "/temp"):
        assert command in reply


async def test_a_huge_message_is_cut_to_the_configured_length(wired):
    from sqlalchemy import select

    from bot.db.models import Message

    dp, bot, session, db = wired
    await dp.feed_raw_update(bot, text_update(1, 8, "я" * 50_000))
    assert len(session.texts_to(8)) == 1
    async with db.connect() as connection:
        stored = (
            await connection.execute(select(Message.text).where(Message.role == "user"))
        ).scalar_one()
    assert stored == "я" * 2000  # MAX_MESSAGE_CHARS


async def test_reset_and_forget_drop_the_cached_dialogue(wired):
    """The engine keeps each dialogue's keys/values between turns; /reset and /forget must
    drop them, or the next reply would still be conditioned on the forgotten history."""
    dp, bot, _, _ = wired
    cache = dp["dialogue"].backend.prefix_cache
    for update_id, command in ((1, "/reset"), (3, "/forget")):
        await dp.feed_raw_update(bot, text_update(update_id, 7, "Запомни: меня зовут Вася"))
        assert 7 in cache
        await dp.feed_raw_update(bot, text_update(update_id + 1, 7, command))
        assert 7 not in cache


async def test_a_reset_replicas_left_stored_is_carried_out_in_its_place_at_the_next_start(wired):
    """An operator goes back from replicas to one process with a /reset still stored in line
    (its replica died before carrying it out): the start answers what came before it, carries
    it out and says so, then answers what came after, from an empty history."""
    import asyncio

    from bot.db import repository
    from bot.dialogue import UserRef

    dp, bot, session, db = wired
    dialogue = dp["dialogue"]
    user = UserRef(7, "Аня")
    before = await dialogue.remember_user_message(user, "Меня зовут Вася", 1)
    await dialogue.remember_command(user, repository.RESET_ROLE, 2)
    await dialogue.remember_user_message(user, "Как меня зовут?", 3)
    tasks = await dp["conversations"].answer_unanswered(bot)
    await asyncio.gather(*tasks)
    shown = session.texts_to(7)
    assert len(shown) == 3 and shown[1] == texts.RESET_DONE, shown
    async with db.connect() as connection:
        rows = (await connection.execute(text("SELECT role, text, id FROM messages"))).all()
    assert sorted((role, t) for role, t, _ in rows if role == "user") == [
        ("user", "Как меня зовут?")
    ]
    assert len(rows) == 2 and before not in [i for *_, i in rows]  # its reply, nothing older


async def test_a_reply_quotes_its_message_when_the_user_has_written_since(wired):
    """Two messages left unanswered by a restart: the reply to the first quotes it (the user
    wrote again since, so a bare reply would read as an answer to the latest); the reply to
    the last needs no quote."""
    import asyncio

    from aiogram.methods import SendMessage

    from bot.dialogue import UserRef

    dp, bot, session, _ = wired
    dialogue = dp["dialogue"]
    user = UserRef(7, "Аня")
    await dialogue.remember_user_message(user, "Первый вопрос", 101)
    await dialogue.remember_user_message(user, "Второй вопрос", 102)
    await asyncio.gather(*await dp["conversations"].answer_unanswered(bot))
    sends = [m for m in session.requests if isinstance(m, SendMessage)]
    quotes = [m.reply_parameters for m in sends]
    assert [q.message_id if q else None for q in quotes] == [101, None]
    assert quotes[0].allow_sending_without_reply  # the user may have deleted it meanwhile


async def test_a_message_written_while_the_reply_is_generated_makes_the_reply_quote(wired):
    """The user sends a second message while the bot is still writing the answer to the
    first: that answer arrives under the second one, so it quotes the first (it used to be
    decided before generating, and the reply came bare)."""
    import asyncio

    from aiogram.methods import SendMessage

    from bot.dialogue import UserRef

    dp, bot, session, _ = wired
    dialogue = dp["dialogue"]
    user = UserRef(7, "Аня")
    await dialogue.remember_user_message(user, "Первый вопрос", 101)
    make_reply = dialogue.make_reply

    async def second_message_arrives_meanwhile(*args, **kwargs):
        await dialogue.remember_user_message(user, "И ещё одно", 102)
        return await make_reply(*args, **kwargs)

    dialogue.make_reply = second_message_arrives_meanwhile
    try:
        await asyncio.gather(*await dp["conversations"].answer_unanswered(bot))
    finally:
        dialogue.make_reply = make_reply
    sends = [m for m in session.requests if isinstance(m, SendMessage)]
    assert [m.reply_parameters.message_id if m.reply_parameters else None for m in sends] == [101]


async def test_in_a_group_only_its_admins_reset_forget_or_retune_the_shared_memory(wired):
    """A group shares one memory and one temperature: any member could wipe or retune it for
    everyone with /reset, /forget or /temp 1.7. Now a member is told that only the group's
    administrators can, and nothing changes; showing the temperature stays open to all."""
    from bot.dialogue import UserRef

    dp, bot, session, db = wired
    dialogue = dp["dialogue"]
    group_id, member, admin = -1001, 11, 12
    session.group_admins.add((group_id, admin))
    group = UserRef(group_id, "Группа")
    await dialogue.remember_user_message(group, "Запомните: встреча в пятницу", 500)
    temperature = await dialogue.get_temperature(group)

    def in_group(update_id: int, user_id: int, text: str) -> dict:
        update = text_update(update_id, user_id, text)
        update["message"]["chat"] = {"id": group_id, "type": "group", "title": "Группа"}
        return update

    async def remembered() -> int:
        async with db.connect() as connection:
            return (
                await connection.execute(
                    text(
                        "SELECT count(*) FROM messages JOIN users ON users.id = messages.user_id"
                        " WHERE users.telegram_id = :chat"
                    ),
                    {"chat": group_id},
                )
            ).scalar_one()

    for update_id, command in enumerate(("/reset", "/forget", "/temp 1.7"), start=1):
        await dp.feed_raw_update(bot, in_group(update_id, member, command))
    assert session.texts_to(group_id) == [texts.GROUP_ADMINS_ONLY] * 3
    assert await remembered() == 1
    assert await dialogue.get_temperature(group) == temperature
    await dp.feed_raw_update(bot, in_group(4, member, "/temp"))
    assert session.texts_to(group_id)[-1].startswith("Текущая температура")

    await dp.feed_raw_update(bot, in_group(5, admin, "/temp 1.7"))
    assert await dialogue.get_temperature(group) == 1.7
    await dp.feed_raw_update(bot, in_group(6, admin, "/reset"))
    assert session.texts_to(group_id)[-1] == texts.RESET_DONE
    assert await remembered() == 0


async def test_a_group_upgraded_to_a_supergroup_keeps_its_memory_and_temperature(wired):
    """Telegram gives the supergroup a new chat id; its first message names the old one. The
    bot used to start from nothing there: no history, the default temperature."""
    from bot.dialogue import UserRef

    dp, bot, session, db = wired
    dialogue = dp["dialogue"]
    old_id, new_id = -5001, -1005001
    await dialogue.remember_user_message(UserRef(old_id, "Группа"), "Встреча в пятницу", 7)
    await dialogue.set_temperature(UserRef(old_id, "Группа"), 0.4)

    def in_supergroup(update_id: int, **fields: object) -> dict:
        message = {
            "message_id": update_id,
            "date": int(time.time()),
            "chat": {"id": new_id, "type": "supergroup", "title": "Группа"},
            "from": {"id": 11, "is_bot": False, "first_name": "Аня"},
        }
        return {"update_id": update_id, "message": message | fields}

    await dp.feed_raw_update(bot, in_supergroup(1, migrate_from_chat_id=old_id))
    assert session.texts_to(new_id) == []  # a service message, not something to answer
    command = {"type": "bot_command", "offset": 0, "length": 5}
    await dp.feed_raw_update(bot, in_supergroup(2, text="/temp", entities=[command]))
    assert session.texts_to(new_id)[-1].startswith("Текущая температура: 0.4")
    async with db.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT users.telegram_id, messages.text FROM messages"
                " JOIN users ON users.id = messages.user_id"
            )
        )
        assert rows.all() == [(new_id, "Встреча в пятницу")]
    # the supergroup's own message 7 is new, not a re-delivery of the old group's message 7
    supergroup = UserRef(new_id, "Группа")
    assert await dialogue.remember_user_message(supergroup, "А когда встреча?", 7) is not None


async def test_a_reply_in_a_forum_topic_sees_only_that_topics_conversation(wired):
    """Before: every topic's messages went into every prompt, so the bot answered a question
    about dogs with the cats discussed in another topic."""
    dp, bot, session, _ = wired
    backend = dp["dialogue"].backend
    with prompts_seen(backend) as prompts:
        await dp.feed_raw_update(bot, forum_update(1, 5, "@test_bot расскажи про кошек"))
        await dp.feed_raw_update(bot, forum_update(2, 9, "@test_bot а что про собак?"))
        await dp.feed_raw_update(bot, forum_update(3, 5, "@test_bot и ещё про кошек"))
    assert len(session.texts_to(-100500)) == 3  # each answered, in its topic
    assert len(prompts) == 3
    assert "кошек" not in prompts[1]  # the dogs' topic
    assert "расскажи про кошек" in prompts[2]  # the cats' topic again
    assert "собак" not in prompts[2]
    # /forget drops what the engine keeps of every topic's dialogue, not only the group's own
    kept = backend.prefix_cache
    assert (-100500, 5) in kept and (-100500, 9) in kept
    session.group_admins.add((-100500, 11))
    await dp.feed_raw_update(bot, forum_update(4, 9, "/forget"))
    assert session.texts_to(-100500)[-1] == texts.FORGET_DONE
    assert (-100500, 5) not in kept and (-100500, 9) not in kept


async def test_a_user_who_blocked_the_bot_is_not_answered_again_and_again(wired, redis_url, caplog):
    """Telegram refuses every message to a user who blocked the bot. With replicas the sweep
    used to generate the reply anew every few seconds for as long as the message was young
    (and log a traceback each time), and a single bot at every start; now the message is
    settled in the database after one try, with a one-line warning."""
    import asyncio
    import logging

    from aiogram.methods import SendMessage

    from bot.conversation import Conversations
    from bot.dialogue import UserRef
    from bot.replicas import ReplicaCoordinator

    dp, bot, session, _ = wired
    dialogue = dp["dialogue"]
    user = UserRef(7, "Аня")
    session.blocked.add(7)
    replicas = await ReplicaCoordinator.connect(redis_url, lease_s=5, wait_s=1)
    owed = Conversations(dialogue, dp["metrics"], dp["settings"], replicas)
    try:
        message_id = await dialogue.remember_user_message(user, "Привет!", 101)
        assert [m.message_id for m in await dialogue.unanswered(600)] == [message_id]
        owed.answer_soon(bot, user, from_id=message_id)
        for _ in range(600):
            if not await dialogue.unanswered(600):
                break
            await asyncio.sleep(0.05)
        assert await dialogue.unanswered(600) == []  # settled: owed no more
        tries = sum(isinstance(m, SendMessage) for m in session.requests)
        assert tries >= 1
        await owed.sweep_once(bot)  # starts an answer at once for anything still owed
        assert not owed._tasks
        await owed.aclose()
        # nor does a single bot's next start answer it
        assert await dp["conversations"].answer_unanswered(bot) == []
        assert sum(isinstance(m, SendMessage) for m in session.requests) == tries
    finally:
        await replicas.aclose()
    assert "the bot may not write there" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_message_answered_with_a_notice_is_not_answered_late(wired):
    """The model was too slow: the user is told to try again, once. The message is settled,
    so the next start does not answer it after all (it did, minutes later, unasked)."""
    from bot.engine import GenerationEngine

    dp, bot, session, _ = wired
    dialogue = dp["dialogue"]
    working = dialogue.backend
    # never started: every request waits out its timeout
    dialogue.backend = GenerationEngine(
        working.model, working.tokenizer, persona=None, timeout_s=0.2
    )
    try:
        await dp.feed_raw_update(bot, text_update(1, 7, "Привет!"))
    finally:
        dialogue.backend.close()
        dialogue.backend = working
    assert session.texts_to(7) == [texts.TIMEOUT]
    assert await dp["conversations"].answer_unanswered(bot) == []
    assert session.texts_to(7) == [texts.TIMEOUT]


async def test_messages_telegram_held_while_the_bot_was_down_are_answered_only_while_recent(
    wired,
):
    """Telegram keeps a stopped bot's updates for a day and delivers them all at the next start.
    Before, each was answered like a new message (replies hours late, the queue full of them).
    Now one sent longer than PENDING_REPLY_MAX_AGE_S before the start is kept in the history
    unanswered, as a message a crash left unanswered that long; one a minute old is answered,
    and so is the user's next message, whose prompt holds both."""
    dp, bot, session, db = wired

    def sent_ago(update: dict, seconds: float) -> dict:
        update["message"]["date"] = int(time.time() - seconds)
        return update

    with prompts_seen(dp["dialogue"].backend) as prompts:
        await dp.feed_raw_update(bot, sent_ago(text_update(1, 7, "Ты тут? Уже час жду"), 3600))
        await dp.feed_raw_update(bot, sent_ago(text_update(2, 7, "Алло"), 60))
        await dp.feed_raw_update(bot, text_update(3, 7, "Привет!"))
    assert len(session.texts_to(7)) == 2
    assert len(prompts) == 2
    assert "Ты тут? Уже час жду" in prompts[0] and "Алло" in prompts[0]
    assert "Ты тут? Уже час жду" in prompts[1] and "Привет!" in prompts[1]
    async with db.connect() as connection:
        rows = (
            await connection.execute(
                text(
                    "SELECT m.telegram_message_id FROM messages m JOIN messages r "
                    "ON r.reply_to_id = m.id ORDER BY m.id"
                )
            )
        ).all()
    assert [row[0] for row in rows] == [2, 3]  # the hour-old message has no reply
    # nor does it get one late at the next start

    assert await dp["conversations"].answer_unanswered(bot) == []


async def test_with_no_late_answers_a_message_sent_just_after_the_start_is_answered(
    tmp_path, tiny_model_dir
):
    """PENDING_REPLY_MAX_AGE_S=0 answers nothing sent before the start; Telegram's dates are
    whole seconds, so a message from the start's own second must not count as held."""
    dp, bot, session, db = await in_process_bot(
        f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", tiny_model_dir, pending_reply_max_age_s=0
    )
    try:
        await dp.feed_raw_update(bot, text_update(1, 7, "Привет!"))
        assert len(session.texts_to(7)) == 1
        held = text_update(2, 7, "Это я писал вчера")
        # two seconds before the start (not before now: the first reply may take longer than
        # that on a busy machine, and "now - 2 s" is then after the start, a live message)
        started = dp["conversations"].online_since.timestamp()
        held["message"]["date"] = int(started) - 2
        await dp.feed_raw_update(bot, held)
        assert len(session.texts_to(7)) == 1
    finally:
        dp["dialogue"].backend.close()
        await db.dispose()


async def test_an_edited_message_is_remembered_as_edited(wired):
    """The user fixes a message in Telegram: the next reply's prompt holds the corrected text
    (before, the bot went on remembering what the chat no longer shows). The edit itself gets
    no reply; an edit of a message the bot never stored changes nothing."""
    dp, bot, session, _ = wired

    def edit_of(update_id: int, message_id: int, text: str) -> dict:
        update = text_update(message_id, 7, text)
        update["message"]["edit_date"] = update["message"]["date"] + 5
        return {"update_id": update_id, "edited_message": update["message"]}

    with prompts_seen(dp["dialogue"].backend) as prompts:
        await dp.feed_raw_update(bot, text_update(1, 7, "Меня зовут Вася"))
        await dp.feed_raw_update(bot, edit_of(2, 1, "Меня зовут Петя"))
        await dp.feed_raw_update(bot, edit_of(3, 99, "Этого сообщения бот не видел"))
        await dp.feed_raw_update(bot, text_update(4, 7, "Как меня зовут?"))
    assert len(session.texts_to(7)) == 2  # one reply to each message, none to the edits
    assert "Меня зовут Вася" in prompts[0]
    assert "Меня зовут Петя" in prompts[1] and "Вася" not in prompts[1]
    assert "не видел" not in prompts[1]
    assert "edited_message" in dp.resolve_used_update_types()  # polling and webhook ask for them


async def test_reset_in_a_forum_topic_forgets_that_topics_conversation_only(wired):
    """Before, an admin's /reset in one topic wiped every topic's conversation."""
    dp, bot, session, _ = wired
    backend = dp["dialogue"].backend
    session.group_admins.add((-100500, 11))
    with prompts_seen(backend) as prompts:
        await dp.feed_raw_update(bot, forum_update(1, 5, "@test_bot расскажи про кошек"))
        await dp.feed_raw_update(bot, forum_update(2, 9, "@test_bot а что про собак?"))
        await dp.feed_raw_update(bot, forum_update(3, 5, "/reset"))
        assert session.texts_to(-100500)[-1] == texts.RESET_TOPIC_DONE
        kept = backend.prefix_cache
        assert (-100500, 5) not in kept and (-100500, 9) in kept
        await dp.feed_raw_update(bot, forum_update(4, 5, "@test_bot и ещё про кошек"))
        await dp.feed_raw_update(bot, forum_update(5, 9, "@test_bot и ещё про собак"))
    assert "расскажи про кошек" not in prompts[2]  # the topic /reset was sent in
    assert "а что про собак?" in prompts[3]  # another topic remembers


async def test_a_mention_alone_gets_an_invitation_not_a_complaint_about_text(wired):
    """Calling the bot in a group by its name alone got "I only understand text"."""
    dp, bot, session, _ = wired
    update = text_update(1, 11, "@test_bot")
    update["message"]["chat"] = {"id": -300, "type": "group", "title": "Группа"}
    await dp.feed_raw_update(bot, update)
    assert session.texts_to(-300) == [texts.LISTENING]


async def test_a_message_reads_its_user_row_once(wired):
    """A message's life (store, history, reply, stored reply) reads the user's row once, in
    the statement that stores the message; it used to be looked up again to build the prompt
    and to store the reply (three reads a message), then apart before the message was added
    (a trip to the database more per message)."""
    from sqlalchemy import event

    dp, bot, session, db = wired
    statements: list[str] = []

    def note(conn, cursor, statement, parameters, context, executemany):
        statements.append(" ".join(statement.split()))

    await dp.feed_raw_update(bot, text_update(1, 7, "Привет!"))  # the user's row exists now
    event.listen(db.sync_engine, "before_cursor_execute", note)
    try:
        await dp.feed_raw_update(bot, text_update(2, 7, "Как дела?"))
    finally:
        event.remove(db.sync_engine, "before_cursor_execute", note)
    assert len(session.texts_to(7)) == 2
    user_reads = [s for s in statements if " FROM users" in s]
    assert len(user_reads) == 1, user_reads
    assert user_reads[0].startswith("INSERT INTO messages"), user_reads


async def test_with_replicas_a_page_message_waits_for_the_owed_telegram_reply_not_forever(
    tmp_path, tiny_model_dir, redis_url
):
    """A message typed on the page, with a Telegram message of the user's still owed when the
    page's request takes the lease: the owed one is answered first, then the page's. The page's
    turn used to be held while it answered what was owed, whose turns waited for it: the
    request hung for good (seen as a 300 s client timeout beside busy processes)."""
    import asyncio

    from bot.dialogue import UserRef
    from bot.replicas import ReplicaCoordinator

    dp, bot, session, db = await in_process_bot(
        f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", tiny_model_dir
    )
    replicas = await ReplicaCoordinator.connect(redis_url, lease_s=5, wait_s=30)
    conversations = dp["conversations"]
    conversations.replicas = replicas
    user = UserRef(7, "Тест")
    try:
        await dp["dialogue"].store_user_message(user, "Из телеграма", telegram_message_id=5)
        reply = await asyncio.wait_for(
            conversations.receive_from_page(bot, user, "Со страницы", lambda text: None), 60
        )
        assert reply.stored
        assert len(session.texts_to(7)) == 1  # the owed Telegram message got its reply there
        async with db.connect() as connection:
            rows = (
                await connection.execute(
                    text(
                        "SELECT m.text, r.id FROM messages m JOIN messages r "
                        "ON r.reply_to_id = m.id ORDER BY r.id"
                    )
                )
            ).all()
        assert [row[0] for row in rows] == ["Из телеграма", "Со страницы"]
    finally:
        await replicas.aclose()
        dp["dialogue"].backend.close()
        await db.dispose()


async def test_with_replicas_telegram_messages_after_a_waiting_page_message_wait_for_it(
    tmp_path, tiny_model_dir, redis_url
):
    """A message typed on the page whose request is still waiting for the lease holds its
    place: a drain answers the Telegram message stored before it and leaves the one stored
    after it (a drain used to answer both, and the page's reply came after a later message's);
    once the page's request could no longer be waiting (its replica died), it is passed over."""
    import asyncio
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from bot.db.models import Message
    from bot.dialogue import UserRef
    from bot.replicas import ReplicaCoordinator

    dp, bot, session, db = await in_process_bot(
        f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", tiny_model_dir
    )
    replicas = await ReplicaCoordinator.connect(redis_url, lease_s=5, wait_s=30)
    conversations, dialogue = dp["conversations"], dp["dialogue"]
    conversations.replicas = replicas
    user = UserRef(7, "Тест")

    async def drain() -> None:
        conversations.answer_soon(bot, user)
        await asyncio.wait_for(asyncio.gather(*conversations._tasks), 60)

    async def answered() -> list[str]:
        async with db.connect() as connection:
            rows = await connection.execute(
                text(
                    "SELECT m.text FROM messages m JOIN messages r ON r.reply_to_id = m.id "
                    "ORDER BY r.id"
                )
            )
            return [row[0] for row in rows.all()]

    try:
        await dialogue.store_user_message(user, "Раньше страницы", telegram_message_id=5)
        page = await dialogue.store_user_message(user, "Со страницы")
        await dialogue.store_user_message(user, "После страницы", telegram_message_id=6)
        await drain()
        assert await answered() == ["Раньше страницы"]
        assert len(session.texts_to(7)) == 1
        async with db.begin() as connection:  # the page's request is past waiting for good
            await connection.execute(
                update(Message)
                .where(Message.id == page.message_id)
                .values(created_at=datetime.now(UTC) - timedelta(seconds=36))
            )
        await drain()
        assert await answered() == ["Раньше страницы", "После страницы"]
    finally:
        await replicas.aclose()
        dialogue.backend.close()
        await db.dispose()


async def test_a_user_who_changed_their_name_is_kept_under_the_new_one(wired):
    """The name stored for a user follows the one Telegram sends with their messages."""
    from sqlalchemy import text as sql

    dp, bot, session, db = wired
    await dp.feed_raw_update(bot, text_update(1, 7, "Привет"))
    renamed = text_update(2, 7, "Я сменила имя")
    renamed["message"]["from"]["first_name"] = "Аня"
    await dp.feed_raw_update(bot, renamed)
    assert len(session.texts_to(7)) == 2
    async with db.connect() as connection:
        names = (await connection.execute(sql("SELECT name FROM users"))).scalars().all()
    assert names == ["Аня"]
