"""Wiring: settings → database → model → dispatcher → polling. Everything is built here once.

Services reach handlers through aiogram's dependency injection (``Dispatcher(dialogue=...,
settings=...)``), never through globals; the model and the database are closed in
``dp.shutdown``.
"""

from __future__ import annotations

import asyncio
import logging

from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramAPIError
from aiogram.types import BotCommand, ErrorEvent
from sqlalchemy.ext.asyncio import AsyncEngine

from bot import texts
from bot.config import Settings
from bot.db.engine import create_engine, create_sessionmaker, upgrade_to_head
from bot.dialogue import DialogueService
from bot.engine import GenerationEngine, load_model
from bot.handlers import make_routers

logger = logging.getLogger(__name__)


class ConfigError(Exception):
    """A setting is missing or wrong; the message is one line saying what to set."""


class RedactSecrets(logging.Filter):
    """Removes the bot token from every log record, tracebacks included."""

    def __init__(self, *secrets: str) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        for secret in self.secrets:
            message = message.replace(secret, "<token>")
            if record.exc_text:
                record.exc_text = record.exc_text.replace(secret, "<token>")
        record.msg, record.args = message, None
        return True


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    token = settings.telegram_bot_token.get_secret_value() if settings.telegram_bot_token else ""
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets(token))
    logging.getLogger("aiogram.event").setLevel(logging.WARNING)  # one line per update otherwise


async def open_services(settings: Settings) -> tuple[AsyncEngine, DialogueService]:
    """Migrate the database, load the model, start the engine: what both front-ends need."""
    db_engine = create_engine(settings.database_url)
    await upgrade_to_head(settings.database_url)
    model, tokenizer = await asyncio.to_thread(
        load_model, settings.model_path, settings.model_device, settings.model_dtype
    )
    engine = GenerationEngine(
        model,
        tokenizer,
        persona=settings.system_prompt or None,
        context_tokens=settings.context_tokens,
        reply_tokens=settings.reply_tokens,
        queue_size=settings.queue_size,
        timeout_s=settings.request_timeout_s,
    )
    await asyncio.to_thread(engine.warm_up)
    engine.start()
    logger.info(
        "model %s ready: context %d tokens, reply %d tokens",
        settings.model_path,
        engine.context_tokens,
        engine.reply_tokens,
    )
    return db_engine, DialogueService(create_sessionmaker(db_engine), engine, settings)


def build_bot(settings: Settings) -> Bot:
    if settings.telegram_bot_token is None or not settings.telegram_bot_token.get_secret_value():
        raise ConfigError(
            "TELEGRAM_BOT_TOKEN is not set: get a token from @BotFather and put it in .env "
            "(see .env.example)"
        )
    api = (
        TelegramAPIServer.from_base(settings.telegram_api_url)
        if settings.telegram_api_url
        else None
    )
    session = AiohttpSession(api=api) if api else AiohttpSession()
    return Bot(token=settings.telegram_bot_token.get_secret_value(), session=session)


async def on_error(event: ErrorEvent) -> bool:
    """Log the failure (the token is redacted by the logging filter), apologise, keep running."""
    logger.error("error while handling update %s", event.update.update_id, exc_info=event.exception)
    message = event.update.message
    if message is not None:
        try:
            await message.answer(texts.ERROR)
        except TelegramAPIError:
            logger.warning("could not send the apology for update %s", event.update.update_id)
    return True


def build_dispatcher(
    dialogue: DialogueService, settings: Settings, db_engine: AsyncEngine
) -> Dispatcher:
    dp = Dispatcher(dialogue=dialogue, settings=settings)
    dp.include_routers(*make_routers())
    dp.errors.register(on_error)

    async def on_startup(bot: Bot) -> None:
        commands = [BotCommand(command=c, description=d) for c, d in texts.COMMANDS.items()]
        await bot.set_my_commands(commands)

    async def on_shutdown() -> None:
        await asyncio.to_thread(dialogue.engine.close)
        await db_engine.dispose()
        logger.info("stopped: model released, database closed")

    dp.startup.register(on_startup)
    dp.shutdown.register(on_shutdown)
    return dp


async def run_polling(settings: Settings) -> None:
    bot = build_bot(settings)  # fail on a missing token before the slow model load
    db_engine, dialogue = await open_services(settings)
    dp = build_dispatcher(dialogue, settings, db_engine)
    me = await bot.get_me()
    logger.info("polling as @%s", me.username)
    await dp.start_polling(
        bot,
        handle_as_tasks=True,
        tasks_concurrency_limit=settings.polling_concurrency,
        handle_signals=True,
        close_bot_session=True,
    )
