"""The bot's log: one format for every line, libraries' lines included, and no secret in it."""

import os

from tests.bot.harness import ROOT, run_python

SCRIPT = """
from bot.config import Settings
from bot.logs import configure_logging
configure_logging(Settings(_env_file=None, telegram_bot_token="123456:SECRET-token"))
from bot.engine import factory  # what the bot imports before opening its backend
from bot.logs import adopt_library_logs
from huggingface_hub.utils import logging as hub_logging
from transformers.utils import logging as transformers_logging
adopt_library_logs()  # bot.engine.factory.open_backend does this first
transformers_logging.get_logger("transformers.modeling_utils").warning(
    "weights missing in 123456:SECRET-token")
hub_logging.get_logger("huggingface_hub.file_download").warning("the hub is unreachable")
"""


def test_transformers_and_hub_warnings_come_once_in_the_bots_format_without_the_token():
    """Before: huggingface_hub's warnings came twice (its own bare line, then ours), and
    transformers' bypassed the format and the filter that hides the bot token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM", "LOG_"))}
    done = run_python("-c", SCRIPT, cwd=ROOT, env=env | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    hub = [line for line in lines if "the hub is unreachable" in line]
    assert len(hub) == 1 and "WARNING huggingface_hub.file_download: " in hub[0], lines
    weights = [line for line in lines if "weights missing" in line]
    assert len(weights) == 1 and "WARNING transformers.modeling_utils: " in weights[0], lines
    assert "SECRET" not in done.stderr and "weights missing in <token>" in weights[0]
