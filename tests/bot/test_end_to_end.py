"""The real `python -m bot` process against a fake Bot API server on 127.0.0.1.

Only TELEGRAM_BOT_TOKEN, TELEGRAM_API_URL, DATABASE_URL and MODEL_PATH are set (plus LOG_LEVEL to
read the prompt the model was given), exactly as an operator's acceptance check would run it.
The same test runs with the model in the bot's process and with the bot on a running
`python -m bot serve` (LLM_BASE_URL; MODEL_PATH then only gives the tokenizer).
"""

import asyncio
import sys

import pytest

from bot import texts
from tests.bot.conftest import SERVER_KEYS
from tests.bot.harness import (
    ALICE,
    BOB,
    ROOT,
    TOKEN,
    BotProcess,
    bot_replies,
    eventually,
    stored_messages,
)


@pytest.fixture(params=["local", "remote"])
def backend_env(request, bot_env):
    """The bot's environment for the model in its process, or on the session's model server."""
    env = {**bot_env, "STREAM_EDIT_INTERVAL_S": "0"}  # every reply streams as it grows
    if request.param == "remote":
        server = request.getfixturevalue("model_server")
        env |= {"LLM_BASE_URL": server.base_url, "LLM_API_KEY": SERVER_KEYS[0]}
    return env


async def test_the_bot_as_users_see_it(fake, backend_env, tmp_path):
    db, log = tmp_path / "bot.db", tmp_path / "bot.log"
    # the model in the bot's process: `python -m bot` itself, exactly as an operator starts it
    # (every other bot test forks its process from tests.bot.forkserver)
    bot = BotProcess(backend_env, log, fork="LLM_BASE_URL" in backend_env)
    try:
        await bot.start(fake)
        assert fake.count("setMyCommands") == 1
        commands = next(c for c in fake.calls if c.method == "setMyCommands").params["commands"]
        names = {c["command"] for c in commands}
        assert names == {"start", "help", "reset", "temp", "forget", "memory"}

        fake.send_text(ALICE, "/start")
        assert "Привет" in (await fake.wait_replies(ALICE, 1))[0]

        fake.send_text(ALICE, "Как дела?")
        # A reply is stored once the user has all of it: the state to wait for (the first
        # message the fake sees may be the streamed start of the reply).
        await eventually(lambda: len(bot_replies(db, ALICE)) == 1, "Alice's reply")
        assert [r for r, _ in stored_messages(db, ALICE)] == ["user", "bot"]
        assert fake.sent_to(ALICE)[1:] == bot_replies(db, ALICE)  # one reply, as stored
        assert fake.count("sendChatAction") >= 1

        for command in ("/temp", "/temp 0,5", "/temp abc", "/temp 7", "/temp"):
            fake.send_text(ALICE, command)
            await fake.wait_replies(ALICE, len(fake.sent_to(ALICE)) + 1)
        shown, set_, bad, out_of_range, shown_again = fake.sent_to(ALICE)[-5:]
        assert "0.8" in shown and "0.5" in set_
        assert "abc" in bad and "0.1" in out_of_range and "2.0" in out_of_range
        assert "0.5" in shown_again  # the bad values changed nothing

        fake.send_sticker(ALICE)
        assert (await fake.wait_replies(ALICE, 8))[-1] == texts.NOT_TEXT

        # two users at once: each gets their own single reply
        fake.send_text(ALICE, "Что посоветуешь почитать?")
        fake.send_text(BOB, "Привет, я Боб!")
        await eventually(lambda: len(bot_replies(db, ALICE)) == 2, "Alice's second reply")
        await eventually(lambda: len(bot_replies(db, BOB)) == 1, "Bob's reply")
        assert len(fake.sent_to(ALICE)) == 9 and fake.sent_to(BOB) == bot_replies(db, BOB)
        assert [t for r, t in stored_messages(db, BOB) if r == "user"] == ["Привет, я Боб!"]

        # restart: the history is still there and goes into the next prompt
        took = await bot.stop()
        assert took < 10
        await bot.start(fake)
        fake.send_text(ALICE, "А ты помнишь меня?")
        await fake.wait_replies(ALICE, 10)
        prompts = [
            line for line in log.read_text(errors="replace").splitlines() if "prompt:" in line
        ]
        assert "Как дела?" in prompts[-1] and "Что посоветуешь почитать?" in prompts[-1]

        # /reset forgets Alice only
        fake.send_text(ALICE, "/reset")
        assert (await fake.wait_replies(ALICE, 11))[-1] == texts.RESET_DONE
        assert stored_messages(db, ALICE) == []
        assert len(stored_messages(db, BOB)) == 2

        assert fake.edits_to(ALICE), "replies are streamed: shown first, then edited as they grow"
        if "LLM_BASE_URL" in backend_env:  # no model loaded here: the server answered
            assert "remote model long-model" in log.read_text(errors="replace")
        await bot.stop()
        assert TOKEN not in log.read_text(errors="replace")
        assert SERVER_KEYS[0] not in log.read_text(errors="replace")
    finally:
        bot.kill()


async def test_help_lists_the_commands_at_once_and_a_wrong_one_gets_the_usage(tmp_path):
    """``python -m bot --help`` answered before the model's stack is imported (it took 7 s
    here, and ``--help`` was refused as a wrong command)."""
    probe = (
        "import sys; from bot.__main__ import main; code = main(sys.argv[1:]); "
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(code)"
    )
    for args, code, stream, expected in (
        (["--help"], 0, 0, "python -m bot serve"),
        (["bogus"], 2, 1, "usage: python -m bot"),
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            probe,
            *args,
            cwd=tmp_path,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        output = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == code, output
        assert expected in output[stream].decode(), output
        assert "torch not loaded" in output[0].decode(), output


async def test_missing_token_and_missing_model_are_one_line_errors(bot_env, tmp_path):
    """Told at once, before aiogram, torch and transformers are imported (it took 17 s here)."""
    probe = (
        "import sys; from bot.__main__ import main; code = main(sys.argv[1:]); "
        "heavy = sorted({'aiogram', 'torch', 'transformers'} & set(sys.modules)); "
        "print('imported:', heavy); sys.exit(code)"
    )
    webhook = {"WEBHOOK_URL": "https://bot.example.com/webhook"}
    for args, drop, extra, expected in (
        ([], "TELEGRAM_BOT_TOKEN", {}, "TELEGRAM_BOT_TOKEN is not set"),
        ([], "MODEL_PATH", {}, "no model at"),
        (["chat"], "MODEL_PATH", {}, "no model at"),
        ([], None, webhook, "WEBHOOK_SECRET is not set"),
        ([], None, {**webhook, "WEBHOOK_SECRET": "my secret!"}, "WEBHOOK_SECRET must be 1-256"),
        (["chat"], None, {"DATABASE_URL": "mysql://u:pw@h/bot"}, "DATABASE_URL: mysql is not"),
    ):
        env = {k: v for k, v in bot_env.items() if not k.startswith("WEBHOOK_")} | extra
        if drop == "MODEL_PATH":
            env["MODEL_PATH"] = str(tmp_path / "no-model")
        elif drop:
            env.pop(drop)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            probe,
            *args,
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 2
        lines = err.decode().strip().splitlines()
        assert lines[-1].startswith("error:") and expected in lines[-1], lines
        assert "Traceback" not in err.decode()
        assert "my secret" not in err.decode()  # a secret is never echoed, even a wrong one
        assert "Value error" not in err.decode() and "pw@" not in err.decode()
        assert "imported: []" in out.decode(), (args, drop, out)


async def test_a_token_telegram_refuses_is_one_line_before_the_model_loads(bot_env, fake, tmp_path):
    """A revoked or mistyped token, or a Bot API URL with /bot at its end: the bot used to load
    the model first and then die with a traceback from getMe (and an unclosed session)."""
    token_refused = "TELEGRAM_BOT_TOKEN was refused by the Bot API"
    for extra, told in (
        ({"TELEGRAM_BOT_TOKEN": "1:not-the-token"}, token_refused),
        ({"TELEGRAM_API_URL": f"{fake.base_url}/bot"}, "without /bot<token>"),
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            cwd=tmp_path,
            env={**bot_env, **extra, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 120)
        output = err.decode()
        assert process.returncode == 2, output[-3000:]
        last = output.strip().splitlines()[-1]
        assert last.startswith("error: ") and told in last, last
        assert "Traceback" not in output and "Unclosed" not in output
        assert "not-the-token" not in output and bot_env["TELEGRAM_BOT_TOKEN"] not in output
        assert "ready:" not in output  # the model was never loaded
    assert fake.calls == []  # 401 and 404 come before the fake records a call
