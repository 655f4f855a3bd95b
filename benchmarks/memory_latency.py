"""What memory costs a message when the user has a long history: storing it with its index, and
building its prompt (history, facts, recall), at ``--messages`` stored messages per user and
``--users`` users in the database.

The database is filled in bulk (rows as the bot stores them: user messages with their reply,
each user message indexed under its content words by the same code,
``bot.morphology.content_lemmas``), then one user's next messages are stored and their prompts
built through the bot's own path (``DialogueService.store_user_message`` and ``prompt_for``),
each timed. The prompt is built twice per message: with memory (as the bot does) and without
(``memory_enabled`` off), so what memory adds is a difference measured on the same message.
Run it on SQLite (the default: a temporary file) and on PostgreSQL (``--database-url``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.memory_set import DEFAULT_FILLER, filler_exchanges

BATCH = 5000


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def fill(db: Any, users: int, messages: int, pairs: list[tuple[str, str]]) -> list[int]:
    """``users`` users with ``messages`` messages each (half of them replies); their ids."""
    from sqlalchemy import bindparam, insert, update

    from bot.db.models import Message, MessageTerm, User
    from bot.morphology import content_lemmas

    ids = []
    async with db.begin() as connection:
        for number in range(users):
            result = await connection.execute(
                insert(User).values(
                    telegram_id=20_000_000 + number, name=f"load {number}", created_at=_now()
                )
            )
            ids.append(result.inserted_primary_key[0])
    # Rows in the order a busy bot stores them: each user message followed by its reply, the
    # users' exchanges interleaved (inserted in order, then each reply linked to the message
    # before it by the ids the database gave).
    per_batch = max(1, BATCH // (2 * len(ids)))
    start = 0
    while start < messages // 2:
        count = min(per_batch, messages // 2 - start)
        chosen = [
            (user_id, *pairs[(start + i + user_id * 7919) % len(pairs)])
            for i in range(count)
            for user_id in ids
        ]
        rows = []
        for user_id, asked, answered in chosen:
            rows += [_row(user_id, "user", asked, None), _row(user_id, "bot", answered, None)]
        async with db.begin() as connection:
            inserted = (
                (
                    await connection.execute(
                        insert(Message).returning(Message.id, sort_by_parameter_order=True), rows
                    )
                )
                .scalars()
                .all()
            )
            asked_ids, reply_ids = inserted[0::2], inserted[1::2]
            await connection.execute(
                update(Message).where(Message.id == bindparam("reply_id")),
                [
                    {"reply_id": reply_id, "reply_to_id": asked_id}
                    for asked_id, reply_id in zip(asked_ids, reply_ids, strict=True)
                ],
            )
            terms = [
                {"user_id": user_id, "message_id": asked_id, "term": term}
                for asked_id, (user_id, asked, _) in zip(asked_ids, chosen, strict=True)
                for term in sorted(content_lemmas(asked))
            ]
            if terms:
                await connection.execute(insert(MessageTerm), terms)
        start += count
    return ids


async def store_naively(sessions: Any, telegram_id: int, text: str) -> None:
    """The same message stored the straightforward way, timed beside the bot's store on the
    same database as the reference: the user's row read first, the message added through the
    ORM, its index words inserted one row each (``executemany``); facts and words worked out
    inside the transaction. Four trips to the database where the bot makes two."""
    from sqlalchemy import insert, select

    from bot.db.models import Message, MessageTerm, User
    from bot.facts import extract_facts
    from bot.morphology import content_lemmas

    async with sessions.begin() as session:
        user = await session.scalar(select(User).where(User.telegram_id == telegram_id))
        message = Message(user_id=user.id, role="user", text=text)
        session.add(message)
        await session.flush()
        extract_facts(text)
        rows = [
            {"user_id": user.id, "message_id": message.id, "term": term}
            for term in content_lemmas(text)
        ]
        if rows:
            await session.execute(insert(MessageTerm), rows)


def _now() -> datetime:
    return datetime.now(UTC)


def _row(user_id: int, role: str, text: str, reply_to: int | None) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "role": role,
        "text": text,
        "reply_to_id": reply_to,
        "created_at": _now(),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy import text as sql

    from bot.config import Settings
    from bot.db.engine import create_engine, create_sessionmaker, upgrade_to_head
    from bot.dialogue import DialogueService, StoredUser, UserRef
    from bot.engine import GenerationEngine
    from models.loading import load_model

    pairs = filler_exchanges(args.filler, 0)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'memory_latency.db'}"
        settings = Settings(database_url=url, model_path=str(args.model))
        model, tokenizer = load_model(settings.model_path, "cpu")
        backend = GenerationEngine(  # never started: its tokenizer, context and persona only
            model,
            tokenizer,
            persona=settings.system_prompt or None,
            context_tokens=settings.context_tokens,
            reply_tokens=settings.reply_tokens,
        )
        await upgrade_to_head(url)
        db = create_engine(url, settings.database_timeout_s, settings.sqlite_synchronous)
        try:
            started = time.perf_counter()
            ids = await fill(db, args.users, args.messages, pairs)
            filled_s = time.perf_counter() - started
            if db.dialect.name == "postgresql":
                # What autovacuum does to a table that grew this much, before it is timed: the
                # planner's statistics and the visibility map (index-only counts) of a database
                # that has been running, not of one loaded a second ago.
                async with db.connect() as connection:
                    autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                    await autocommit.execute(sql("VACUUM ANALYZE"))
            async with db.connect() as connection:
                total = (await connection.execute(sql("SELECT count(*) FROM messages"))).scalar()
                durability = {}
                if db.dialect.name == "postgresql":  # what a commit waits for on this server
                    for setting in ("fsync", "synchronous_commit"):
                        shown = await connection.execute(sql(f"SHOW {setting}"))
                        durability[f"postgresql_{setting}"] = shown.scalar()
            print(f"{total:,} messages in the database ({filled_s:.0f} s to fill)", flush=True)
            dialogue = DialogueService(create_sessionmaker(db), backend, settings)
            user = UserRef(20_000_000, "load 0")
            # Another user as long-lived, with memory off: storing without facts and index.
            user_off = UserRef(20_000_000 + min(1, len(ids) - 1), "load 1")
            if user_off != user:
                await dialogue.set_memory(user_off, False)
            # A third long-lived user for the reference store, so that its rows stay out of
            # the measured user's prompts.
            naive_telegram_id = 20_000_000 + min(2, len(ids) - 1)
            store, store_off, store_naive, with_memory, without = [], [], [], [], []
            for number in range(args.probes):
                asked, answered = pairs[(number * 104729) % len(pairs)]
                if user_off != user:
                    began = time.perf_counter()
                    stored_off = await dialogue.store_user_message(user_off, asked)
                    store_off.append(1000 * (time.perf_counter() - began))
                    assert stored_off is not None
                    await dialogue.store_reply(user_off, answered, stored_off.message_id)
                began = time.perf_counter()
                stored = await dialogue.store_user_message(user, asked)
                store.append(1000 * (time.perf_counter() - began))
                began = time.perf_counter()  # the reference, right after, on the same text
                await store_naively(dialogue.sessions, naive_telegram_id, asked)
                store_naive.append(1000 * (time.perf_counter() - began))
                assert stored is not None and stored.author is not None
                began = time.perf_counter()
                await dialogue.prompt_for(user, stored.message_id, author=stored.author)
                with_memory.append(1000 * (time.perf_counter() - began))
                off = StoredUser(stored.author.id, stored.author.temperature, False)
                began = time.perf_counter()
                await dialogue.prompt_for(user, stored.message_id, author=off)
                without.append(1000 * (time.perf_counter() - began))
                await dialogue.store_reply(user, answered, stored.message_id, author=stored.author)
        finally:
            await db.dispose()
    added = [a - b for a, b in zip(with_memory, without, strict=True)]
    return {
        "sqlite_synchronous": settings.sqlite_synchronous,
        **durability,
        "messages_per_user": args.messages,
        "messages_in_database": total,
        "users": len(ids),
        "probes": args.probes,
        "store_ms_p50": _quantile(store, 0.5),
        "store_ms_p95": _quantile(store, 0.95),
        "store_naive_ms_p50": _quantile(store_naive, 0.5),
        "store_naive_ms_p95": _quantile(store_naive, 0.95),
        "store_without_memory_ms_p50": _quantile(store_off, 0.5) if store_off else None,
        "store_without_memory_ms_p95": _quantile(store_off, 0.95) if store_off else None,
        "prompt_ms_p50": _quantile(with_memory, 0.5),
        "prompt_ms_p95": _quantile(with_memory, 0.95),
        "prompt_without_memory_ms_p95": _quantile(without, 0.95),
        "memory_added_ms_p50": _quantile(added, 0.5),
        "memory_added_ms_p95": _quantile(added, 0.95),
        "memory_added_ms_mean": round(statistics.fmean(added), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory_latency", description=__doc__
    )
    parser.add_argument("--model", type=Path, required=True, help="its tokenizer and context")
    parser.add_argument("--database-url", help="default: a temporary SQLite file")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--messages", type=int, default=10_000, help="stored messages per user")
    parser.add_argument("--probes", type=int, default=100, help="messages timed")
    parser.add_argument("--filler", type=Path, default=DEFAULT_FILLER)
    parser.add_argument("--json", type=Path, help="also write a result for benchmarks/results/")
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(args))
    print(
        f"{figures['messages_per_user']:,} messages for the user, "
        f"{figures['messages_in_database']:,} in the database: storing a message p95 "
        f"{figures['store_ms_p95']} ms (memory off: {figures['store_without_memory_ms_p95']} ms, "
        f"stored the straightforward way: {figures['store_naive_ms_p95']} ms); "
        f"prompt p95 {figures['prompt_ms_p95']} ms with memory, "
        f"{figures['prompt_without_memory_ms_p95']} ms without; memory adds p50 "
        f"{figures['memory_added_ms_p50']} ms, p95 {figures['memory_added_ms_p95']} ms"
    )
    if args.json:
        from benchmarks.machine import describe_machine

        database = (args.database_url or "sqlite").split(":")[0].split("+")[0]
        document = {
            "benchmark": "memory_latency",
            "machine": describe_machine(),
            "settings": {
                "database": database,
                "model": args.model.name,
                **(
                    {"sqlite_synchronous": figures["sqlite_synchronous"]}
                    if database == "sqlite"
                    else {k: v for k, v in figures.items() if k.startswith("postgresql_")}
                ),
            },
            "figures": figures,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
