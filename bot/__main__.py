"""`python -m bot`: the Telegram bot; `python -m bot chat`: console chat; `python -m bot serve
[--host H] [--port P]`: the OpenAI-compatible model server (bot.engine.server);
`python -m bot webapp-link --user-id N`: a signed link to the Mini App's page (bot.webapp)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from dotenv import load_dotenv
from pydantic import ValidationError

from bot.config import ConfigError, Settings
from bot.logs import configure_logging

USAGE = "usage: python -m bot [chat | serve [--host HOST] [--port PORT] | webapp-link --user-id N]"
HELP = f"""{USAGE}

  python -m bot          the Telegram bot (polling, or webhook mode when WEBHOOK_URL is set)
  python -m bot chat     talk to the model in this terminal, with the same memory
  python -m bot serve    the OpenAI-compatible model server (LLM_BASE_URL for the bot)
  python -m bot webapp-link --user-id N
                         a signed, short-lived link to the Mini App's page as user N

Settings come from the environment and .env (see .env.example)."""


def parse_serve(args: list[str], settings: Settings) -> tuple[str, int]:
    """``serve``'s options; the defaults come from SERVE_HOST / SERVE_PORT."""
    parser = argparse.ArgumentParser(prog="python -m bot serve")
    parser.add_argument("--host", default=settings.serve_host)
    parser.add_argument("--port", type=int, default=settings.serve_port)
    options = parser.parse_args(args)
    return options.host, options.port


def webapp_link(args: list[str], settings: Settings) -> int:
    """Print a link that opens the Mini App's page as a user, in any browser: the page's
    address (WEBAPP_URL, or the local server) with launch data signed by the bot's token, as
    Telegram's clients pass it; valid for WEBAPP_AUTH_MAX_AGE_S."""
    from bot.webapp.auth import launch_link, sign_init_data

    parser = argparse.ArgumentParser(prog="python -m bot webapp-link")
    parser.add_argument("--user-id", type=int, required=True, help="the Telegram user's id")
    parser.add_argument("--name", default="Оператор", help="the name the page shows")
    options = parser.parse_args(args)
    try:
        token = settings.require_token()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    port = settings.listen_port if settings.webhook_url else settings.webapp_port
    if not settings.webapp_url and not port:
        print(
            "error: set WEBAPP_URL (the page's https address) or, in polling mode, WEBAPP_PORT "
            "(the bot then serves the page on it)",
            file=sys.stderr,
        )
        return 2
    page = settings.webapp_url or f"http://{settings.listen_host}:{port}/app/"
    print(launch_link(page, sign_init_data(token, options.user_id, options.name)))
    hours = settings.webapp_auth_max_age_s / 3600
    print(f"valid for {hours:g} h (WEBAPP_AUTH_MAX_AGE_S)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Start the bot; a configuration problem is one line on stderr and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):  # before torch and transformers are imported: at once
        print(HELP)
        return 0
    if args not in ([], ["chat"]) and args[:1] not in (["serve"], ["webapp-link"]):
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
    if args[:1] == ["webapp-link"]:
        return webapp_link(args[1:], settings)
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
