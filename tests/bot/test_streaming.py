"""Streaming replies: first words early, edits within Telegram's per-chat limit, final = stored."""

import asyncio
import itertools
import time

import pytest
from aiogram import Bot
from aiogram.methods import EditMessageText, SendMessage

from bot.streaming import ReplyStream
from tests.bot.harness import stored_messages
from tests.bot.recording_session import RecordingSession, in_process_bot, text_update


def what_the_user_sees(session: RecordingSession, chat_id: int) -> list[str]:
    """The chat's bot messages after all edits, in order."""
    texts: dict[int, str] = {}
    for index, method in enumerate(session.requests):
        if isinstance(method, SendMessage) and int(method.chat_id) == chat_id:
            texts[index + 1] = method.text  # the recording session's message ids
        elif isinstance(method, EditMessageText) and int(method.chat_id) == chat_id:
            texts[int(method.message_id)] = method.text
    return list(texts.values())


async def test_a_streamed_reply_is_edited_into_the_stored_text(tmp_path, chatty_model_dir):
    db_path = tmp_path / "bot.db"
    dp, bot, session, db = await in_process_bot(
        f"sqlite+aiosqlite:///{db_path}",
        chatty_model_dir,
        reply_tokens=30,
        system_prompt="",
        stream_edit_interval_s=0.0,
    )
    forwards = 0

    def after_the_first_token_is_shown(module, args):  # type: ignore[no-untyped-def]
        """Runs in the worker before each forward pass: the second one (the first decoding
        step) waits until the first token's text has reached Telegram. On a busy machine the
        event loop may otherwise get no time until the whole short reply is done, and the reply
        would then be sent once, whole: correct, but not the streaming this test is about."""
        nonlocal forwards
        forwards += 1
        deadline = time.monotonic() + 10
        while forwards == 2 and time.monotonic() < deadline:
            if any(isinstance(m, SendMessage) for m in session.requests):
                break
            time.sleep(0.001)

    model = dp["dialogue"].backend.model
    hook = model.transformer.h[0].attn.c_attn.register_forward_pre_hook(
        after_the_first_token_is_shown
    )
    try:
        await dp.feed_raw_update(bot, text_update(1, 7, "Привет!"))
    finally:
        hook.remove()
        dp["dialogue"].backend.close()
        await db.dispose()
    sends = [m for m in session.requests if isinstance(m, SendMessage)]
    edits = [m for m in session.requests if isinstance(m, EditMessageText)]
    assert len(sends) == 1  # one message, grown by edits
    assert edits, "the reply was not streamed"
    stored = [text for role, text in stored_messages(db_path, 7) if role == "bot"]
    assert what_the_user_sees(session, 7) == stored == ["Привет, как дела?"]
    assert stored[0].startswith(sends[0].text)  # the first words were the reply's beginning


@pytest.fixture
def recording_bot():
    session = RecordingSession()
    return Bot("42:TEST", session=session), session


CHAT = 5


async def test_edits_keep_to_one_per_interval_and_end_with_the_final_text(recording_bot):
    bot, session = recording_bot
    interval = 0.2
    stream = ReplyStream(bot, CHAT, interval)
    started = time.monotonic()
    words = []
    while time.monotonic() - started < 1.0:  # a token every 10 ms for a second
        words.append(f"слово{len(words)}")
        stream.update(" ".join(words))
        await asyncio.sleep(0.01)
    final = " ".join(words) + "."
    await stream.finish(final)

    times = [t - started for t in session.times]
    assert times[0] >= interval - 0.02  # nothing before the interval from the user's message
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= interval - 0.02
    assert len(times) <= 1.0 / interval + 2  # ~100 updates became a handful of requests
    assert what_the_user_sees(session, CHAT) == [final]


async def test_a_quick_reply_is_sent_once_without_edits(recording_bot):
    bot, session = recording_bot
    stream = ReplyStream(bot, CHAT, interval_s=1.0)
    stream.update("Быстрый")
    stream.update("Быстрый ответ")
    await stream.finish("Быстрый ответ.")
    assert [type(m) for m in session.requests] == [SendMessage]
    assert what_the_user_sees(session, CHAT) == ["Быстрый ответ."]


async def test_a_final_text_longer_than_a_message_continues_in_new_messages(recording_bot):
    bot, session = recording_bot
    stream = ReplyStream(bot, CHAT, interval_s=0.0)
    stream.update("начало")
    await asyncio.sleep(0.01)
    await stream.finish("слово " * 1200)
    seen = what_the_user_sees(session, CHAT)
    assert len(seen) == 2 and all(len(text) <= 4096 for text in seen)
    assert " ".join(seen).split() == ["слово"] * 1200


async def test_a_reply_resumed_after_a_dead_replica_goes_into_its_message(recording_bot):
    """A replica died while streaming into message 77: the survivor's reply replaces that
    message's text, and no second message appears."""
    bot, session = recording_bot
    announced: list[int] = []

    async def on_sent(message_id: int) -> None:
        announced.append(message_id)

    stream = ReplyStream(bot, CHAT, interval_s=0.0, resume_message_id=77, on_sent=on_sent)
    stream.update("Новый")
    await asyncio.sleep(0.01)
    await stream.finish("Новый ответ.")
    assert all(isinstance(m, EditMessageText) and m.message_id == 77 for m in session.requests)
    assert session.requests[-1].text == "Новый ответ."
    assert announced == []  # the message was known already


async def test_the_message_a_reply_goes_into_is_announced_once(recording_bot):
    bot, session = recording_bot
    announced: list[int] = []

    async def on_sent(message_id: int) -> None:
        announced.append(message_id)

    stream = ReplyStream(bot, CHAT, interval_s=0.0, on_sent=on_sent)
    stream.update("Начало")
    await asyncio.sleep(0.01)
    stream.update("Начало ответа")
    await asyncio.sleep(0.01)
    await stream.finish("Начало ответа.")
    assert announced == [1]  # the recording session's id of the first request
    assert what_the_user_sees(session, CHAT) == ["Начало ответа."]


async def test_a_resumed_message_that_is_gone_gets_the_reply_anew(recording_bot):
    bot, session = recording_bot
    session.gone.add(77)  # the user deleted the half-written reply
    stream = ReplyStream(bot, CHAT, interval_s=0.0, resume_message_id=77)
    await stream.finish("Ответ.")
    assert [type(m) for m in session.requests] == [EditMessageText, SendMessage]
    assert session.texts_to(CHAT) == ["Ответ."]


async def test_a_failed_stream_update_is_superseded_without_an_error_in_the_log(recording_bot):
    """The first words could not be sent (Telegram down past the retries, or a replica's lease
    ran out): the final text still goes out, and the failed update is dealt with, not left to
    asyncio's "Task exception was never retrieved" traceback at ERROR."""
    import gc

    from aiogram.exceptions import TelegramNetworkError

    bot, session = recording_bot
    unhandled: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unhandled.append(context["message"]))
    record = session.make_request
    failed: list[SendMessage] = []

    async def down_once(bot, method, timeout=None):  # type: ignore[no-untyped-def]
        if isinstance(method, SendMessage) and not failed:
            failed.append(method)
            raise TelegramNetworkError(method, "down")
        return await record(bot, method, timeout)

    session.make_request = down_once  # type: ignore[method-assign]
    try:
        stream = ReplyStream(bot, CHAT, interval_s=0.0)
        stream.update("начало")
        for _ in range(200):
            if failed and stream._pump is not None and stream._pump.done():
                break
            await asyncio.sleep(0.01)
        await stream.finish("начало ответа.")
        del stream
        gc.collect()
        assert what_the_user_sees(session, CHAT) == ["начало ответа."]
        assert unhandled == []
    finally:
        loop.set_exception_handler(None)


async def test_a_reply_whose_message_id_cannot_be_kept_still_finishes(recording_bot, caplog):
    """The database refuses to note the reply's message (only needed after a crash): the reply
    the user has is still finished, and the caller goes on to store it (``finish`` used to raise
    when the reply was sent in one go, so a delivered reply was not stored and was sent again
    at the next start)."""
    bot, session = recording_bot

    async def database_down(message_id: int) -> None:
        raise ConnectionError("database down")

    quick = ReplyStream(bot, CHAT, interval_s=1.0, on_sent=database_down)
    quick.update("Быстрый")
    await quick.finish("Быстрый ответ.")
    streamed = ReplyStream(bot, CHAT, interval_s=0.0, on_sent=database_down)
    streamed.update("Начало")
    await asyncio.sleep(0.01)
    await streamed.finish("Начало ответа.")
    assert [type(m) for m in session.requests] == [SendMessage, SendMessage, EditMessageText]
    assert what_the_user_sees(session, CHAT) == ["Быстрый ответ.", "Начало ответа."]
    assert caplog.text.count("the reply's message id was not kept: ConnectionError") == 2


async def test_a_group_gets_progress_edits_only_within_its_messages_a_minute(recording_bot):
    """Telegram allows a group ~20 messages a minute, edits included: a reply streamed there
    shows its progress only while the minute has room beyond a reserve, and its final text
    always goes. Scaled down here: 6 a second, 2 of them kept for final texts. A private chat
    beside it is not held back."""
    from bot.streaming import GroupPace

    bot, session = recording_bot
    pace = GroupPace(limit=6, reserve=2, window_s=1.0)
    group, private = -100123, CHAT
    finals = []
    started = time.monotonic()
    for chat in (group, private):
        stream = ReplyStream(bot, chat, interval_s=0.05, pace=pace)
        words: list[str] = []
        while time.monotonic() - started < (0.6 if chat == group else 2.0):
            words.append(f"слово{len(words)}")
            stream.update(" ".join(words))
            await asyncio.sleep(0.01)
        finals.append(" ".join(words) + ".")
        await stream.finish(finals[-1])

    def sent_to(chat: int) -> list[float]:
        return [
            at - started
            for at, method in zip(session.times, session.requests, strict=True)
            if int(method.chat_id) == chat
        ]

    # At most 4 progress requests (the first words, 3 edits; ~12 without the pace), the final.
    assert 2 <= len(sent_to(group)) <= 5, sent_to(group)
    assert what_the_user_sees(session, group) == [finals[0]]
    assert len(sent_to(private)) > 6  # ~28 (every 50 ms for 1.4 s): not held to the group's 6
    assert what_the_user_sees(session, private) == [finals[1]]


def test_group_pace_counts_a_sliding_minute_and_leaves_private_chats_alone():
    from bot.streaming import GroupPace

    now = [0.0]
    pace = GroupPace(limit=20, reserve=5, window_s=60.0, clock=lambda: now[0])
    for second in range(15):
        now[0] = float(second)
        assert pace.progress_wait_s(-1) == 0.0
        pace.note(-1)
        pace.note(7)  # a private chat: never counted
    assert pace.progress_wait_s(-1) == pytest.approx(60.0 - 14.0)  # until second 0 leaves
    assert pace.progress_wait_s(-2) == 0.0  # another group has its own minute
    assert pace.progress_wait_s(7) == 0.0
    now[0] = 60.5
    assert pace.progress_wait_s(-1) == 0.0


async def test_a_reply_cancelled_while_its_pending_update_is_dropped_sends_nothing(recording_bot):
    """Stopping a reply (a replica's shutdown after its grace period) while ``finish`` drops the
    update waiting out its interval stops the reply: the final text is not sent anyway. The
    cancellation used to be taken for the update's own and swallowed, and the reply went on."""
    bot, session = recording_bot
    stream = ReplyStream(bot, CHAT, interval_s=60.0)  # the update waits out a long interval
    stream.update("Начало ответа")
    await asyncio.sleep(0)  # the update's task starts waiting
    finishing = asyncio.create_task(stream.finish("Весь ответ."))
    await asyncio.sleep(0)  # finish() cancels that task and waits for it to end
    finishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finishing
    assert session.requests == []


async def test_an_edit_that_failed_with_the_whole_text_is_made_again_by_finish(recording_bot):
    """Telegram answered 502 to the edit that carried the whole reply: the final edit must
    still go. The text used to be recorded as shown before the call succeeded, finish() then
    skipped it, and the reply was stored as delivered while the user saw only its first
    words."""
    bot, session = recording_bot
    stream = ReplyStream(bot, CHAT, interval_s=0.0)
    stream.update("Первые")
    await asyncio.sleep(0.05)
    assert what_the_user_sees(session, CHAT) == ["Первые"]
    session.failing_edits = 1
    whole = "Первые слова всего ответа."
    stream.update(whole)
    await asyncio.sleep(0.05)
    assert session.failing_edits == 0  # that edit was tried, and failed
    await stream.finish(whole)
    edits = [m for m in session.requests if isinstance(m, EditMessageText)]
    assert [m.text for m in edits] == [whole, whole]  # the failed one, then the one that went


async def test_a_private_reply_streams_as_a_draft_and_is_sent_once_whole(recording_bot):
    """With drafts the progress is an ephemeral preview and the reply one message, sent whole
    when it is done: nothing a crash could leave on the user's screen. Its id is announced
    then, so a crash before the reply is stored makes no second message."""
    from aiogram.methods import SendMessageDraft

    from bot.streaming import Drafts

    bot, session = recording_bot
    session.drafts_offered = True
    announced: list[int] = []

    async def on_sent(message_id: int) -> None:
        announced.append(message_id)

    drafts = Drafts()
    stream = ReplyStream(bot, CHAT, 0.0, on_sent=on_sent, drafts=drafts, draft_id=31)
    stream.update("Начало")
    await asyncio.sleep(0.02)
    stream.update("Начало ответа")
    await asyncio.sleep(0.02)
    await stream.finish("Начало ответа.")
    assert [type(m) for m in session.requests] == [SendMessageDraft, SendMessageDraft, SendMessage]
    assert [m.draft_id for m in session.requests[:2]] == [31, 31]  # one draft, animated
    assert [m.text for m in session.requests[:2]] == ["Начало", "Начало ответа"]
    assert session.texts_to(CHAT) == ["Начало ответа."] and announced == [3]
    assert drafts.enabled and drafts.sent == 2


async def test_a_bot_api_without_drafts_is_asked_once_then_replies_stream_by_edits(recording_bot):
    from aiogram.methods import SendMessageDraft

    from bot.streaming import Drafts

    bot, session = recording_bot  # a Bot API server that answers 404 to sendMessageDraft
    drafts = Drafts()
    for reply in ("Первый ответ.", "Второй ответ."):
        stream = ReplyStream(bot, CHAT, 0.0, drafts=drafts, draft_id=5)
        stream.update(reply[:6])
        await asyncio.sleep(0.02)
        await stream.finish(reply)
    kinds = [type(m) for m in session.requests]
    assert kinds == [SendMessageDraft, SendMessage, EditMessageText, SendMessage, EditMessageText]
    assert what_the_user_sees(session, CHAT) == ["Первый ответ.", "Второй ответ."]
    assert not drafts.enabled


async def test_groups_and_resumed_replies_never_use_drafts(recording_bot):
    from bot.streaming import Drafts

    bot, session = recording_bot
    session.drafts_offered = True
    for stream in (
        ReplyStream(bot, -100, 0.0, drafts=Drafts(), draft_id=5),
        ReplyStream(bot, CHAT, 0.0, drafts=Drafts(), draft_id=6, resume_message_id=77),
    ):
        stream.update("Ответ")
        await asyncio.sleep(0.02)
        await stream.finish("Ответ.")
    assert {type(m) for m in session.requests} == {SendMessage, EditMessageText}


async def test_a_final_text_telegram_refuses_for_a_while_is_delivered_once_it_is_back(
    recording_bot, monkeypatch
):
    """Telegram answers 502 to the final message past every retry: finish() keeps trying for
    ``outage_s`` and the user gets the whole reply, once, with the long reply's second message
    sent once too. It used to raise at once: the reply was left for the next start and the
    user got an apology meanwhile."""
    from bot import streaming

    monkeypatch.setattr(streaming, "OUTAGE_RETRY_INTERVAL_S", 0.01)
    bot, session = recording_bot
    stream = ReplyStream(bot, CHAT, 0.0, outage_s=5.0)
    session.failing_sends = 3
    whole = "слово " * 1200
    await stream.finish(whole)
    assert session.failing_sends == 0
    sends = [m.text for m in session.requests if isinstance(m, SendMessage)]
    assert len(sends) == 3 + 2  # three refused, then each of the two messages once
    assert " ".join(sends[3:]).split() == ["слово"] * 1200


async def test_a_final_text_is_given_up_after_the_outage_allowance(recording_bot, monkeypatch):
    from aiogram.exceptions import TelegramServerError

    from bot import streaming

    monkeypatch.setattr(streaming, "OUTAGE_RETRY_INTERVAL_S", 0.01)
    bot, session = recording_bot
    session.failing_sends = 10**6
    stream = ReplyStream(bot, CHAT, 0.0, outage_s=0.2)
    started = time.monotonic()
    with pytest.raises(TelegramServerError):
        await stream.finish("Ответ.")
    assert 0.2 <= time.monotonic() - started < 5


async def test_a_message_noted_for_the_reply_meanwhile_is_written_into(recording_bot):
    """Another replica's message for this reply was noted after this attempt began (it lost
    the lease while sending it): the reply goes into it, not into a second message."""
    from aiogram.methods import SendMessageDraft

    from bot.streaming import Drafts

    bot, session = recording_bot
    session.drafts_offered = True
    asked: list[int] = []

    async def noted() -> int | None:
        asked.append(1)
        return 88

    stream = ReplyStream(bot, CHAT, 0.0, drafts=Drafts(), draft_id=4, noted_message=noted)
    stream.update("Ответ")
    await asyncio.sleep(0.02)
    await stream.finish("Ответ целиком.")
    assert [type(m) for m in session.requests] == [SendMessageDraft, EditMessageText]
    assert session.requests[-1].message_id == 88 and session.requests[-1].text == "Ответ целиком."
    assert asked == [1]
