"""Fixtures for bot tests: the fake Bot API server and the environment of the bot process."""

import os

import pytest

from tests.bot.fake_telegram import FakeTelegram
from tests.bot.harness import TOKEN
from tests.bot.model_server import ModelServer

#: The keys `python -m bot serve` accepts in the tests (API_KEYS).
SERVER_KEYS = ("test-key-1", "test-key-2")
SERVER_PERSONA = "Я бот."


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


@pytest.fixture(scope="session")
def long_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's shape with an 8192-token window (random weights, the same tokenizer):
    a row asked for thousands of tokens keeps the server busy for seconds, so a full queue is a
    state that lasts, not a moment to catch."""
    import torch
    from transformers import AutoTokenizer

    from trainer.modeling import build_scratch_model

    path = tmp_path_factory.mktemp("long-model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = build_scratch_model(
        tokenizer, {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 8192}
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_server(long_model_dir, tmp_path_factory):
    """One real `python -m bot serve` for the session: two keys, two rows, one waiting place."""
    log = tmp_path_factory.mktemp("model-server") / "serve.log"
    server = ModelServer(
        long_model_dir,
        log,
        API_KEYS=",".join(SERVER_KEYS),
        MAX_BATCH="2",
        QUEUE_SIZE="1",
        SYSTEM_PROMPT=SERVER_PERSONA,
        SERVED_MODEL_NAME="long-model",
        LOG_LEVEL="INFO",
    ).start()
    yield server
    assert server.stop() == 0, server.log_text()[-3000:]
