"""aiogram Routers, one per feature, in the order they are tried."""

from aiogram import Router

from bot.handlers import chat, commands, memory, other


def make_routers() -> list[Router]:
    """Fresh routers for one dispatcher: commands first, then text, then everything else."""
    return [
        commands.make_router(),
        memory.make_router(),
        chat.make_router(),
        other.make_router(),
    ]
