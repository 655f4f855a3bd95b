"""Fixtures for bot tests: the fake Bot API server and the environment of the bot process."""

import os

import pytest

from tests.bot.fake_telegram import FakeTelegram
from tests.bot.harness import TOKEN


@pytest.fixture
async def fake():
    server = FakeTelegram(TOKEN)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def bot_env(tmp_path, tiny_model_dir, fake):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "DATABASE_"))}
    env.update(
        {
            "TELEGRAM_BOT_TOKEN": TOKEN,
            "TELEGRAM_API_URL": fake.base_url,
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
            "MODEL_PATH": str(tiny_model_dir),
            "LOG_LEVEL": "DEBUG",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env
