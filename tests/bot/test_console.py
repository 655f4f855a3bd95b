"""`python -m bot chat`: the reply shown as it is generated, then remembered."""

import io
import os
import sqlite3

from bot.console import ConsoleStream
from tests.bot.harness import ROOT, run_python


def test_console_stream_prints_each_new_piece_once():
    out = io.StringIO()
    stream = ConsoleStream(out)
    for text in ("При", "Привет", "Привет", "Привет, как"):
        stream.update(text)
    stream.finish("Привет, как дела?")
    assert out.getvalue() == "Привет, как дела?\n"

    replaced = io.StringIO()
    stream = ConsoleStream(replaced)
    stream.update("Начало отв")
    stream.finish("Слишком долго.")  # the timeout text replaces a partial reply
    assert replaced.getvalue() == "Начало отв\nСлишком долго.\n"


def test_console_chat_answers_and_remembers(tmp_path, tiny_model_dir):
    db = tmp_path / "bot.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "LLM_"))}
    env |= {
        "MODEL_PATH": str(tiny_model_dir),
        "DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        "PYTHONPATH": str(ROOT),
        "STREAM_EDIT_INTERVAL_S": "0",
    }
    done = run_python("-m", "bot", "chat", cwd=tmp_path, env=env, input_="Привет!\n/exit\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Loading weights" not in done.stderr  # no loader bar under the chat prompt
    shown = [line for line in done.stdout.splitlines() if "бот> " in line]
    assert len(shown) == 1
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT role, text FROM messages ORDER BY id").fetchall()
    assert [role for role, _ in rows] == ["user", "bot"]
    assert shown[0].endswith(rows[1][1])  # what was shown is what is remembered
