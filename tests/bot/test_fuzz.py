"""Hostile input: random Unicode, huge and empty strings, and /temp arguments, through the real
dispatcher (handlers, filters, middlewares, database, model). Nothing may crash, no reply may
exceed Telegram's 4096 characters, and the error apology must never be needed."""

import asyncio

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bot import texts
from tests.bot.recording_session import in_process_bot, text_update

USER = 77


@pytest.fixture(scope="module")
def wired(tiny_model_dir, tmp_path_factory):
    loop = asyncio.new_event_loop()
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('fuzz') / 'bot.db'}"

    # hundreds of messages from one user: the rate limit (test_rate_limit) would drop them
    starting = in_process_bot(url, tiny_model_dir, 4, rate_limit_messages=0)
    dp, bot, session, db = loop.run_until_complete(starting)
    counter = iter(range(1, 10**9))
    yield lambda text: _feed(loop, dp, bot, session, next(counter), text)
    dp["dialogue"].backend.close()
    loop.run_until_complete(db.dispose())
    loop.close()


def _feed(loop, dp, bot, session, update_id, text):
    before = len(session.texts_to(USER))
    loop.run_until_complete(dp.feed_raw_update(bot, text_update(update_id, USER, text)))
    return session.texts_to(USER)[before:]


def _check(replies: list[str]) -> None:
    for reply in replies:
        assert reply != texts.ERROR
        assert 0 < len(reply) <= 4096


FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(text=st.text(max_size=3000))
@example(text="")
@example(text="x" * 100_000)
@example(text="@@ВТОРОЙ@@ " * 500)
@example(text="\x00\x01\u202e\ufeff")
def test_random_text_never_crashes_or_overflows(wired, text):
    replies = wired(text)
    assert len(replies) == 1  # every message gets exactly one answer
    _check(replies)


@FUZZ
@given(
    command=st.sampled_from(["/temp", "/start", "/help", "/reset", "/forget", "/stats", "/nope"]),
    argument=st.one_of(st.text(max_size=200), st.floats().map(str), st.integers().map(str)),
)
@example(command="/temp", argument="nan")
@example(command="/temp", argument="1e309")
@example(command="/temp", argument="0," + "9" * 5000)
@example(command="/temp", argument="я" * 5000)
def test_random_commands_never_crash(wired, command, argument):
    replies = wired(f"{command} {argument}")
    assert len(replies) == 1
    _check(replies)
