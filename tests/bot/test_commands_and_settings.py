"""/temp parsing, message splitting, settings validation."""

import pytest
from pydantic import ValidationError

from bot.config import Settings
from bot.dialogue import TemperatureError, clean_user_text, parse_temperature, split_message


@pytest.mark.parametrize(
    ("raw", "value"), [("0.7", 0.7), ("0,7", 0.7), (" 1 ", 1.0), ("2", 2.0), ("0.1", 0.1)]
)
def test_temperature_accepts_dot_and_comma(raw, value):
    assert parse_temperature(raw, 0.1, 2.0) == value


@pytest.mark.parametrize("raw", ["abc", "", "0.7.1", "1e", "семь"])
def test_temperature_that_is_not_a_number_gets_a_clear_russian_message(raw):
    with pytest.raises(TemperatureError, match="Не понял число"):
        parse_temperature(raw, 0.1, 2.0)


@pytest.mark.parametrize("raw", ["0", "2.5", "-1", "nan", "inf", "0.09"])
def test_temperature_out_of_range_is_refused(raw):
    with pytest.raises(TemperatureError, match=r"от 0\.1 до 2\.0"):
        parse_temperature(raw, 0.1, 2.0)


def test_long_replies_are_split_under_telegrams_limit():
    text = ("слово " * 2000).strip()
    pieces = split_message(text)
    assert len(pieces) == 3 and all(len(p) <= 4096 for p in pieces)
    assert " ".join(pieces) == text
    assert split_message("x" * 5000) == ["x" * 4096, "x" * 904]
    assert split_message("коротко") == ["коротко"]


def test_user_text_loses_control_characters_and_tags():
    assert clean_user_text("при\x00вет @@ВТОРОЙ@@ я бот\u200b") == "при вет @ВТОРОЙ@ я бот"


def test_settings_defaults_and_validation(monkeypatch):
    for name in ("TELEGRAM_BOT_TOKEN", "DATABASE_URL", "MODEL_PATH", "TEMPERATURE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert settings.database_url == "sqlite+aiosqlite:///data/bot.db"
    assert settings.model_path == "checkpoints/latest"
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "123:TOPSECRETVALUE")
    settings = Settings(_env_file=None)
    assert "TOPSECRETVALUE" not in repr(settings)
    monkeypatch.setenv("TEMPERATURE", "3")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)
    monkeypatch.setenv("TEMPERATURE", "0.5")
    monkeypatch.setenv("MODEL_DTYPE", "int4")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


@pytest.mark.parametrize(
    ("given", "used"),
    [
        # what PostgreSQL hosts hand out: SQLAlchemy alone loaded psycopg (not installed, not
        # async) and asyncpg refused libpq's sslmode
        (
            "postgres://u:pw@db.example.com:5432/bot",
            "postgresql+asyncpg://u:pw@db.example.com:5432/bot",
        ),
        (
            "postgresql://u:pw@h/bot?sslmode=require&application_name=tg",
            "postgresql+asyncpg://u:pw@h/bot?ssl=require&application_name=tg",
        ),
        ("sqlite:///data/bot.db", "sqlite+aiosqlite:///data/bot.db"),
        ("sqlite+aiosqlite:///data/bot.db", "sqlite+aiosqlite:///data/bot.db"),
        ("postgresql+asyncpg://u:pw@h/bot", "postgresql+asyncpg://u:pw@h/bot"),
    ],
)
def test_a_database_url_as_hosts_write_it_gets_the_async_driver(given, used):
    assert Settings(_env_file=None, database_url=given).database_url == used


@pytest.mark.parametrize(
    ("given", "told"),
    [
        ("mysql://u:pw@h/bot", "mysql is not supported, only SQLite and PostgreSQL"),
        ("postgresql+psycopg2://u:pw@h/bot", "through asyncpg (async), not psycopg2"),
        ("data/bot.db", "not a database URL"),
    ],
)
def test_a_database_url_the_bot_cannot_use_is_refused_saying_what_to_write(given, told):
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, database_url=given)
    assert told in str(refused.value)
    assert "pw@" not in str(refused.value).replace(f"input_value='{given}'", "")
