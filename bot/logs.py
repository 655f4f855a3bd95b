"""Logging for every entry point: one format, and the bot token never written anywhere."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from bot.config import Settings


class RedactSecrets(logging.Filter):
    """Removes the bot token and API keys from every log record, tracebacks included."""

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
    secrets = [settings.telegram_bot_token, settings.llm_api_key]
    known = [s.get_secret_value() for s in secrets if s is not None]
    if settings.redis_url is not None:  # its password, as redis-py's errors may print the URL
        password = urlsplit(settings.redis_url.get_secret_value()).password
        known += [password] if password else []
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets(*known, *settings.server_api_keys))
    logging.getLogger("aiogram.event").setLevel(logging.WARNING)  # one line per update otherwise


#: Libraries that print through a handler of their own instead of the application's.
_SELF_LOGGING_LIBRARIES = ("transformers", "huggingface_hub")


def adopt_library_logs() -> None:
    """Send transformers' and huggingface_hub's records through the application's handlers.

    Once imported, each library hangs its own stream handler on its root logger: transformers
    also stops propagation, so its lines skip the format and the token filter set up above;
    huggingface_hub keeps propagating, so each of its warnings came out twice (bare, then in
    our format). Call after they are imported (it drops the handlers they already added; they
    add none later).
    """
    for name in _SELF_LOGGING_LIBRARIES:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
