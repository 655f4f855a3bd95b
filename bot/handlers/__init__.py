"""aiogram Routers, one per feature; ``ROUTERS`` is the order they are tried in."""

from bot.handlers import chat, commands, other

ROUTERS = (commands.router, chat.router, other.router)
