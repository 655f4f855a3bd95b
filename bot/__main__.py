"""`python -m bot` runs the Telegram bot (long polling); `python -m bot chat`: console chat."""

from __future__ import annotations

import asyncio
import logging
import sys

from dotenv import load_dotenv
from pydantic import ValidationError

from bot.app import ConfigError, configure_logging, run_bot
from bot.config import Settings
from bot.console import run_console
from bot.engine import ModelLoadError

USAGE = "usage: python -m bot [chat]"


def main(argv: list[str] | None = None) -> int:
    """Start the bot; a configuration problem is one line on stderr and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["chat"]):
        print(USAGE, file=sys.stderr)
        return 2
    load_dotenv()
    try:
        settings = Settings()
    except ValidationError as error:
        for problem in error.errors():
            name = ".".join(str(p) for p in problem["loc"]).upper() or "settings"
            print(f"error: {name}: {problem['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if args == ["chat"]:
        logging.getLogger().setLevel(logging.WARNING)  # keep the terminal for the conversation
    try:
        asyncio.run(run_console(settings) if args == ["chat"] else run_bot(settings))
    except (ConfigError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
