"""``python -m bot.memory_eval``: the prompt the bot would build for a question asked after a
long dialogue — is the answer in it?

A 355M dialogue model's replies cannot tell whether memory works (it may not use what it is
given); the prompt can. For each input dialogue the tool stores its turns as one user's
history through the bot's own path (:meth:`bot.dialogue.DialogueService.store_user_message`
and ``store_reply``: facts extracted and messages indexed exactly as for a Telegram user), its
turns dated minutes apart, then stores the ``probe`` as the user's next message and builds the
prompt for it exactly as the bot would (:meth:`~bot.dialogue.DialogueService.prompt_for`),
with the real model's tokenizer and context.

Input, one dialogue a line: ``{"id": str, "turns": [user, bot, user, ...], "probe": str}``
(other fields are ignored). Output, one line each: ``{"id", "prompt" (the exact prompt text),
"prompt_tokens", "memory_tokens" (the facts exchange and recalled exchanges in it),
"latency_ms" (building the prompt), "store_ms" (storing the probe with its index)}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

USER_BASE = 10_000_000  # eval users' ids: far from any real Telegram id in a shared database


def read_dialogues(path: Path) -> Iterator[dict[str, Any]]:
    """Each line's dialogue; a line that is not one is an error naming the line."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                turns, probe = item["turns"], item["probe"]
                if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                    raise TypeError("turns must be a list of strings")
                if not isinstance(probe, str):
                    raise TypeError("probe must be a string")
            except (ValueError, KeyError, TypeError) as error:
                raise SystemExit(f"{path}:{number}: not a dialogue ({error})") from None
            yield {"id": str(item.get("id", number)), "turns": turns, "probe": probe}


async def evaluate(args: argparse.Namespace) -> int:
    from bot.config import Settings
    from bot.db.engine import create_engine, create_sessionmaker, upgrade_to_head
    from bot.dialogue import DialogueService, UserRef
    from bot.engine import GenerationEngine
    from dataset_tools.dialogue_format import render_prompt
    from models.loading import load_model

    overrides: dict[str, Any] = {"memory_tokens": args.memory_tokens}
    if args.model:
        overrides["model_path"] = str(args.model)
    if args.context_tokens:
        overrides["context_tokens"] = args.context_tokens
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'memory_eval.db'}"
        settings = Settings(database_url=url, **overrides)
        model, tokenizer = load_model(settings.model_path, "cpu")
        # The engine is never started: only its tokenizer, context and persona are used.
        backend = GenerationEngine(
            model,
            tokenizer,
            persona=settings.system_prompt or None,
            context_tokens=settings.context_tokens,
            reply_tokens=settings.reply_tokens,
        )
        await upgrade_to_head(url)
        db = create_engine(url, settings.database_timeout_s, settings.sqlite_synchronous)
        dialogue = DialogueService(create_sessionmaker(db), backend, settings)
        written = 0
        try:
            with args.output.open("w", encoding="utf-8") as out:
                for number, item in enumerate(read_dialogues(args.input)):
                    user = UserRef(USER_BASE + number + args.user_offset, f"eval {item['id']}")
                    await dialogue.set_memory(user, args.memory == "on")
                    await _store(dialogue, user, item["turns"])
                    await _space_timestamps(db, user.telegram_id)
                    started = time.perf_counter()
                    stored = await dialogue.store_user_message(user, item["probe"])
                    store_ms = 1000 * (time.perf_counter() - started)
                    assert stored is not None
                    started = time.perf_counter()
                    prompt = await dialogue.prompt_for(
                        user, stored.message_id, author=stored.author
                    )
                    latency_ms = 1000 * (time.perf_counter() - started)
                    text = render_prompt(prompt.turns, backend.persona)
                    record = {
                        "id": item["id"],
                        "prompt": text,
                        "prompt_tokens": backend.count_tokens(text),
                        "memory_tokens": prompt.memory_tokens,
                        "latency_ms": round(latency_ms, 2),
                        "store_ms": round(store_ms, 2),
                    }
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    written += 1
                    if args.progress:
                        print(f"\r{written} dialogue(s)", end="", file=sys.stderr, flush=True)
        finally:
            await db.dispose()
    if args.progress:
        print(file=sys.stderr)
    print(f"{written} prompt(s) written to {args.output}")
    return 0


async def _store(dialogue: Any, user: Any, turns: list[str]) -> None:
    """The dialogue as the bot would have stored it: each user turn, then the reply to it."""
    for at in range(0, len(turns) - 1, 2):
        stored = await dialogue.store_user_message(user, turns[at])
        await dialogue.store_reply(user, turns[at + 1], stored.message_id, author=stored.author)
    if len(turns) % 2:  # a last user turn with no reply: stored, unanswered
        await dialogue.store_user_message(user, turns[-1])


TURN_SPACING = timedelta(minutes=2)  # a long dialogue's turns, as if typed over days


async def _space_timestamps(db: Any, telegram_id: int) -> None:
    """Date the user's stored turns ``TURN_SPACING`` apart, the last one now: the history
    looks as one written over days would (stored in one go, every turn would share a second)."""
    from sqlalchemy import bindparam, select, update

    from bot.db.models import Message, User

    async with db.begin() as connection:
        owner = select(User.id).where(User.telegram_id == telegram_id).scalar_subquery()
        ids = (
            (await connection.execute(select(Message.id).where(Message.user_id == owner)))
            .scalars()
            .all()
        )
        if not ids:
            return
        now, last = datetime.now(UTC), max(ids)
        await connection.execute(
            update(Message).where(Message.id == bindparam("message_id")),
            [{"message_id": i, "created_at": now - (last - i) * TURN_SPACING} for i in ids],
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot.memory_eval", description=__doc__)
    parser.add_argument("--input", type=Path, required=True, help="dialogues, JSONL")
    parser.add_argument("--output", type=Path, required=True, help="prompts, JSONL")
    parser.add_argument("--model", type=Path, help="model directory (default: MODEL_PATH)")
    parser.add_argument(
        "--database-url", help="where to store the dialogues (default: a temporary SQLite file)"
    )
    parser.add_argument("--context-tokens", type=int, help="default: CONTEXT_TOKENS or the model's")
    parser.add_argument("--memory", choices=["on", "off"], default="on")
    parser.add_argument(
        "--memory-tokens", type=int, default=300, help="MEMORY_TOKENS (recalled exchanges)"
    )
    parser.add_argument(
        "--user-offset", type=int, default=0, help="added to the eval users' ids (a reused DB)"
    )
    parser.add_argument("--progress", action="store_true", help="count dialogues on stderr")
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"--input {args.input}: no such file")
    return asyncio.run(evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
