"""`python -m bot`: the Telegram bot; `python -m bot chat`: console chat; `python -m bot serve
[--host H] [--port P]`: the OpenAI-compatible model server (bot.engine.server)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from dotenv import load_dotenv
from pydantic import ValidationError

from bot.config import ConfigError, Settings
from bot.logs import configure_logging

USAGE = "usage: python -m bot [chat | serve [--host HOST] [--port PORT]]"
HELP = f"""{USAGE}

  python -m bot          the Telegram bot (polling, or webhook mode when WEBHOOK_URL is set)
  python -m bot chat     talk to the model in this terminal, with the same memory
  python -m bot serve    the OpenAI-compatible model server (LLM_BASE_URL for the bot)

Settings come from the environment and .env (see .env.example)."""


def parse_serve(args: list[str], settings: Settings) -> tuple[str, int]:
    """``serve``'s options; the defaults come from SERVE_HOST / SERVE_PORT."""
    parser = argparse.ArgumentParser(prog="python -m bot serve")
    parser.add_argument("--host", default=settings.serve_host)
    parser.add_argument("--port", type=int, default=settings.serve_port)
    options = parser.parse_args(args)
    return options.host, options.port


def main(argv: list[str] | None = None) -> int:
    """Start the bot; a configuration problem is one line on stderr and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):  # before torch and transformers are imported: at once
        print(HELP)
        return 0
    if args not in ([], ["chat"]) and args[:1] != ["serve"]:
        print(USAGE, file=sys.stderr)
        return 2
    load_dotenv()
    try:
        settings = Settings()
    except ValidationError as error:
        for problem in error.errors():
            name = ".".join(str(p) for p in problem["loc"]).upper() or "settings"
            reason = problem["msg"].removeprefix("Value error, ")  # pydantic's wording
            print(f"error: {name}: {reason}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:  # what can be told at once, before ~15 s of importing aiogram, torch and transformers
        if not args:
            settings.require_token()
            settings.require_webhook_secret()
        settings.require_model()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from bot.engine import ModelLoadError  # the model's stack: only once there is work to do

    if args == ["chat"]:
        logging.getLogger().setLevel(logging.WARNING)  # keep the terminal for the conversation
    # Each entry point imported when chosen: the model server needs no aiogram (a faster start).
    if args[:1] == ["serve"]:
        from bot.engine.server import run_server

        host, port = parse_serve(args[1:], settings)
        main_task = run_server(settings, host, port)
    elif args == ["chat"]:
        from bot.console import run_console

        main_task = run_console(settings)
    else:
        from bot.app import run_bot

        main_task = run_bot(settings)
    try:
        asyncio.run(main_task)
    except (ConfigError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
