"""What the bot remembers about a user beyond the window: facts in the prompt, /memory and its
buttons, /memory off, /reset keeping facts, /forget removing them, no user's facts in another's
prompt, nothing from groups."""

from __future__ import annotations

import pytest
from aiogram.methods import AnswerCallbackQuery, EditMessageText, SendMessage

from bot import texts
from tests.bot.recording_session import in_process_bot, text_update
from tests.bot.test_handlers import prompts_seen


@pytest.fixture
async def short_window(tmp_path, tiny_model_dir):
    """A bot whose prompt holds only the last 4 messages, so a fact falls out of the window
    after two more exchanges."""
    dp, bot, session, db = await in_process_bot(
        f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", tiny_model_dir, history_messages=4
    )
    yield dp, bot, session, db
    dp["dialogue"].backend.close()
    await db.dispose()


def callback_update(update_id: int, user_id: int, data: str, message_id: int) -> dict:
    return {
        "update_id": update_id,
        "callback_query": {
            "id": str(update_id),
            "from": {"id": user_id, "is_bot": False, "first_name": "Тест"},
            "chat_instance": "1",
            "data": data,
            "message": {
                "message_id": message_id,
                "date": 0,
                "chat": {"id": user_id, "type": "private"},
                "from": {"id": 42, "is_bot": True, "first_name": "Тестбот"},
                "text": "…",
            },
        },
    }


async def _chat(dp, bot, user_id: int, texts_: list[str], first_update: int) -> None:
    for offset, text in enumerate(texts_):
        await dp.feed_raw_update(bot, text_update(first_update + offset, user_id, text))


async def test_a_name_told_long_ago_is_still_in_the_prompt(short_window):
    dp, bot, _, _ = short_window
    with prompts_seen(dp["dialogue"].backend) as prompts:
        await _chat(dp, bot, 7, ["Меня зовут Аня, я из Казани", "Как погода?", "А что нового?"], 1)
        await _chat(dp, bot, 7, ["Расскажи анекдот", "Ну и ладно"], 4)
    last = prompts[-1].split("\n")
    assert "Меня зовут Аня, я из Казани" not in last  # left the window, and not asked about
    assert last[:2] == ["Что ты обо мне помнишь?", "Тебя зовут Аня. Ты живёшь в городе Казань."]
    assert last[-1] == "Ну и ладно"


async def test_an_old_exchange_the_message_is_about_comes_back_before_it(short_window):
    """Out of the window, but the new message asks about it: the exchange is recalled, right
    before the message (after the window, whose cached keys/values stay good), and stays
    there in the next prompts (which then extend this one); a message about nothing said
    before recalls nothing new."""
    dp, bot, _, _ = short_window
    said = "Моя сестра Оля работает в банке"
    with prompts_seen(dp["dialogue"].backend) as prompts:
        await _chat(dp, bot, 7, [said, "Как погода?", "А что нового?", "Расскажи анекдот"], 1)
        await _chat(dp, bot, 7, ["Где работает сестра?", "Какую музыку ты слушаешь?"], 5)
    recalled, unrelated = prompts[-2].split("\n"), prompts[-1].split("\n")
    assert recalled[-3] == said and recalled[-1] == "Где работает сестра?"
    assert recalled.index(said) > recalled.index("Расскажи анекдот")
    assert unrelated.index(said) == unrelated.index("Где работает сестра?") - 2  # held there
    assert unrelated[-3] == "Где работает сестра?"  # and nothing new before the new message
    other = await dp["dialogue"].memory(_ref(8))  # another user's memory holds none of it
    assert other == (True, [])
    with prompts_seen(dp["dialogue"].backend) as prompts:
        await _chat(dp, bot, 8, ["Где работает сестра?"], 7)
    assert said not in prompts[-1]  # no memory crosses users


async def test_memory_lists_the_facts_and_a_button_forgets_one(short_window):
    dp, bot, session, _ = short_window
    await _chat(dp, bot, 7, ["Меня зовут Аня. Мне 21 год."], 1)
    await dp.feed_raw_update(bot, text_update(2, 7, "/memory"))
    listing = [m for m in session.requests if isinstance(m, SendMessage)][-1]
    assert "имя: Аня" in listing.text and "возраст: 21" in listing.text
    buttons = [row[0] for row in listing.reply_markup.inline_keyboard]
    assert [b.text for b in buttons] == ["Забыть: имя", "Забыть: возраст"]
    await dp.feed_raw_update(bot, callback_update(3, 7, buttons[0].callback_data, 99))
    answered = [m for m in session.requests if isinstance(m, AnswerCallbackQuery)][-1]
    assert answered.text == texts.MEMORY_FORGOTTEN
    edited = [m for m in session.requests if isinstance(m, EditMessageText)][-1]
    assert "имя" not in edited.text and "возраст: 21" in edited.text
    with prompts_seen(dp["dialogue"].backend) as prompts:
        await _chat(dp, bot, 7, ["Привет"], 4)
    assert "Тебя зовут" not in prompts[-1] and "Тебе 21 год." in prompts[-1]


async def test_another_users_button_forgets_nothing_of_mine(short_window):
    """Two users say the same words; each prompt holds only its own user's facts, and a
    callback naming the other user's fact id deletes nothing."""
    dp, bot, session, _ = short_window
    await _chat(dp, bot, 7, ["Меня зовут Аня"], 1)
    await _chat(dp, bot, 8, ["Меня зовут Боря"], 2)
    _, facts = await dp["dialogue"].memory(_ref(7))
    anya_fact = facts[0][0]
    await dp.feed_raw_update(bot, callback_update(3, 8, f"forget-fact:{anya_fact}", 99))
    answered = [m for m in session.requests if isinstance(m, AnswerCallbackQuery)][-1]
    assert answered.text == texts.MEMORY_GONE
    assert (await dp["dialogue"].memory(_ref(7)))[1] == facts
    with prompts_seen(dp["dialogue"].backend) as prompts:
        await _chat(dp, bot, 8, ["Как меня зовут?"], 4)
    assert "Тебя зовут Боря" in prompts[-1] and "Аня" not in prompts[-1]


async def test_memory_off_keeps_facts_out_of_the_prompt_until_on(short_window):
    dp, bot, session, _ = short_window
    await _chat(dp, bot, 7, ["Меня зовут Аня", "/memory off"], 1)
    assert session.texts_to(7)[-1] == texts.MEMORY_OFF
    with prompts_seen(dp["dialogue"].backend) as prompts:
        await _chat(dp, bot, 7, ["Я живу в Твери", "Привет"], 3)
        await _chat(dp, bot, 7, ["/memory on", "Как дела?"], 5)
    assert "Тебя зовут" not in prompts[0] and "Тебя зовут" not in prompts[1]
    assert "Тебя зовут Аня." in prompts[2]
    assert "Твери" not in prompts[2].split("\n")[1]  # nothing was kept while memory was off
    await dp.feed_raw_update(bot, text_update(7, 7, "/memory maybe"))
    assert session.texts_to(7)[-1] == texts.MEMORY_USAGE


async def test_reset_keeps_the_facts_and_forget_removes_them(short_window):
    dp, bot, session, db = short_window
    await _chat(dp, bot, 7, ["Меня зовут Аня", "/reset"], 1)
    assert session.texts_to(7)[-1] == texts.RESET_DONE and "/memory" in texts.RESET_DONE
    assert [(k, v) for _, k, v in (await dp["dialogue"].memory(_ref(7)))[1]] == [("name", "Аня")]
    await _chat(dp, bot, 7, ["/forget"], 3)
    assert (await dp["dialogue"].memory(_ref(7)))[1] == []
    async with db.connect() as connection:
        from sqlalchemy import text

        assert (await connection.execute(text("SELECT count(*) FROM user_facts"))).scalar() == 0


async def test_a_newer_statement_supersedes_the_older(short_window):
    dp, bot, _, _ = short_window
    await _chat(dp, bot, 7, ["Я живу в Казани", "Я переехала в Тверь"], 1)
    assert [(k, v) for _, k, v in (await dp["dialogue"].memory(_ref(7)))[1]] == [("city", "Тверь")]


async def test_a_group_keeps_no_member_facts(short_window):
    dp, bot, _, _ = short_window
    update = text_update(1, 7, "@test_bot меня зовут Аня")
    update["message"]["chat"] = {"id": -100, "type": "group", "title": "Группа"}
    await dp.feed_raw_update(bot, update)
    assert (await dp["dialogue"].memory(_ref(-100)))[1] == []


def _ref(telegram_id: int):
    from bot.dialogue import UserRef

    return UserRef(telegram_id, None)


def _edit(update_id: int, user_id: int, message_id: int, text: str) -> dict:
    """Telegram's update for a user editing message ``message_id`` of their chat."""
    update = text_update(message_id, user_id, text)
    update["message"]["edit_date"] = update["message"]["date"] + 5
    return {"update_id": update_id, "edited_message": update["message"]}


async def test_an_edit_replaces_what_the_message_taught_memory(short_window):
    """A user fixes a message: its facts and its index words are the corrected text's (before,
    the fact from the text the chat no longer shows stayed pinned in every prompt)."""
    dp, bot, _, _ = short_window
    dialogue = dp["dialogue"]
    await _chat(dp, bot, 7, ["Меня зовут Вася, моя сестра Оля работает в банке"], 1)
    await dp.feed_raw_update(bot, _edit(2, 7, 1, "Меня зовут Петя"))
    assert [(k, v) for _, k, v in (await dialogue.memory(_ref(7)))[1]] == [("name", "Петя")]
    await dp.feed_raw_update(bot, _edit(3, 7, 1, "Привет!"))
    assert (await dialogue.memory(_ref(7)))[1] == []
    await _chat(dp, bot, 7, ["Как погода?", "А что нового?", "Расскажи анекдот"], 4)
    with prompts_seen(dialogue.backend) as prompts:
        await _chat(dp, bot, 7, ["Где работает сестра Оля?"], 7)
    assert "банке" not in prompts[-1] and "Привет!" not in prompts[-1]


async def test_forget_leaves_nothing_to_recall(short_window):
    """/forget deletes the index with the messages: a later question about what was said
    recalls nothing, and no index row of the user is left."""
    dp, bot, _, db = short_window
    said = "Моя сестра Оля работает в банке"
    await _chat(dp, bot, 7, [said, "Как погода?", "А что нового?", "/forget"], 1)
    await _chat(dp, bot, 7, ["Как погода?", "А что нового?", "Расскажи анекдот"], 5)
    with prompts_seen(dp["dialogue"].backend) as prompts:
        await _chat(dp, bot, 7, ["Где работает сестра Оля?"], 8)
    assert said not in prompts[-1]
    async with db.connect() as connection:
        from sqlalchemy import text

        rows = await connection.execute(
            text(
                "SELECT count(*) FROM message_terms t JOIN messages m ON m.id = t.message_id "
                "WHERE m.text = :said"
            ),
            {"said": said},
        )
        assert rows.scalar() == 0


async def test_memory_survives_a_restart(tmp_path, tiny_model_dir):
    """Facts and the index are in the database: a bot started again on it lists the facts,
    pins them, and recalls an old exchange."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    said = "Моя сестра Оля работает в банке"
    dp, bot, _, db = await in_process_bot(url, tiny_model_dir, history_messages=4)
    try:
        await _chat(dp, bot, 7, ["Меня зовут Аня", said, "Как погода?", "А что нового?"], 1)
    finally:
        dp["dialogue"].backend.close()
        await db.dispose()
    dp, bot, _, db = await in_process_bot(url, tiny_model_dir, history_messages=4)
    try:
        assert [(k, v) for _, k, v in (await dp["dialogue"].memory(_ref(7)))[1]] == [
            ("name", "Аня")
        ]
        with prompts_seen(dp["dialogue"].backend) as prompts:
            await _chat(dp, bot, 7, ["Где работает сестра Оля?"], 5)
        assert "Тебя зовут Аня." in prompts[-1] and said in prompts[-1]
    finally:
        dp["dialogue"].backend.close()
        await db.dispose()


async def test_the_prompt_with_memory_stays_within_the_context(tmp_path, tiny_model_dir):
    """Facts, recalled exchanges and long messages together: every prompt the model gets
    fits its window less the reply (a recalled exchange gives way before the window does)."""
    from dataset_tools.dialogue_format import render_prompt

    dp, bot, _, db = await in_process_bot(
        f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", tiny_model_dir, memory_tokens=10_000
    )
    backend = dp["dialogue"].backend
    long = " ".join(["сестра работает в банке и любит длинные истории про кошек"] * 6)
    try:
        with prompts_seen(backend) as prompts:
            await _chat(dp, bot, 7, ["Меня зовут Аня, мне 30 лет, я из Казани"], 1)
            await _chat(dp, bot, 7, [f"{long} {n}" for n in range(8)], 2)
            await _chat(dp, bot, 7, ["Где работает сестра? Что она любит?"], 10)
        assert len(prompts) == 10
        for prompt in prompts:
            rendered = render_prompt(prompt.split("\n"), backend.persona)
            assert backend.count_tokens(rendered) <= backend.prompt_budget
        assert prompts[-1].startswith("Что ты обо мне помнишь?")
    finally:
        backend.close()
        await db.dispose()
