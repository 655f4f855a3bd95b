"""Load test (`make loadtest`, not part of `make test`): many users writing at once to the real
bot process, through the fake Bot API server on 127.0.0.1, with a tiny model.

Checks that every message is answered exactly once and in per-user order, none lost, and prints
p50/p95 reply latency and messages per second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dataset_tools.dialogue_format import render_dialogue
from dataset_tools.sample_data import generate_dialogues
from models.scratch_tokenizer import train_scratch_tokenizer
from tests.bot.fake_telegram import FakeTelegram
from tests.bot.harness import TOKEN, BotProcess, answered, bot_replies
from trainer.modeling import build_scratch_model


def build_tiny_model(path: Path) -> None:
    tokenizer = train_scratch_tokenizer((render_dialogue(d) for d in generate_dialogues()), 600)
    model = build_scratch_model(
        tokenizer, {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 1024}
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(users: int, messages: int, reply_tokens: int) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="loadtest-"))
    build_tiny_model(workdir / "model")
    fake = FakeTelegram(TOKEN)
    await fake.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "DATABASE_"))}
    env.update(
        TELEGRAM_BOT_TOKEN=TOKEN,
        TELEGRAM_API_URL=fake.base_url,
        DATABASE_URL=f"sqlite+aiosqlite:///{workdir / 'bot.db'}",
        MODEL_PATH=str(workdir / "model"),
        REPLY_TOKENS=str(reply_tokens),
        QUEUE_SIZE=str(users * messages),
        REQUEST_TIMEOUT_S="600",
        RATE_LIMIT_MESSAGES="0",  # a load test floods on purpose
        LOG_LEVEL="DEBUG",
        PYTHONUNBUFFERED="1",
    )
    bot = BotProcess(env, workdir / "bot.log")
    await bot.start(fake)
    ids = [10_000 + i for i in range(users)]
    sent_at: dict[tuple[int, int], float] = {}
    started = time.monotonic()
    for k in range(messages):  # everyone at once: message k of every user, then k + 1
        for user in ids:
            sent_at[(user, k)] = time.monotonic()
            fake.send_text(user, f"пользователь {user} сообщение {k}")
    total = users * messages
    try:
        # A reply is stored once it is delivered whole: when every message has one, the bot has
        # nothing left to send, and the counts below are final (no sleep-and-hope).
        db = workdir / "bot.db"
        await fake.wait_for(lambda: sum(len(bot_replies(db, u)) for u in ids) >= total, 1800)
    finally:
        await bot.stop()
        await fake.stop()
    elapsed = max(c.at for c in fake.calls if c.method == "sendMessage" and c.ok) - started

    latencies, problems = [], []
    for user in ids:
        replies = [
            c
            for c in fake.calls
            if c.method == "sendMessage" and c.ok and int(c.params["chat_id"]) == user
        ]
        if len(replies) != messages:
            problems.append(f"user {user}: {len(replies)} replies to {messages} messages")
        latencies += [c.at - sent_at[(user, k)] for k, c in enumerate(replies[:messages])]
        pairs = answered(workdir / "bot.db", user)
        if [m for m, _ in pairs] != [f"пользователь {user} сообщение {k}" for k in range(messages)]:
            problems.append(f"user {user}: stored messages lost, doubled or out of order")
        if any(reply is None for _, reply in pairs) or len(bot_replies(db, user)) != messages:
            problems.append(f"user {user}: stored replies missing or doubled")
    # per-user order: the k-th prompt of a user ends with that user's message k
    prompts = re.findall(
        r"пользователь (\d+) сообщение (\d+) @@ВТОРОЙ@@\s*$",
        (workdir / "bot.log").read_text(errors="replace"),
        flags=re.MULTILINE,
    )
    seen: dict[int, list[int]] = {}
    for user, k in prompts:
        seen.setdefault(int(user), []).append(int(k))
    for user in ids:
        if seen.get(user) != list(range(messages)):
            problems.append(f"user {user}: answered in order {seen.get(user)}")

    print(f"{users} users x {messages} messages = {total} messages, reply <= {reply_tokens} tokens")
    print(f"all answered in {elapsed:.1f} s: {total / elapsed:.1f} messages/s")
    print(
        f"reply latency: p50 {statistics.median(latencies):.2f} s, "
        f"p95 {percentile(latencies, 0.95):.2f} s, max {max(latencies):.2f} s"
    )
    print(
        "every message answered exactly once, in per-user order"
        if not problems
        else "PROBLEMS:\n  " + "\n  ".join(problems[:20])
    )
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.loadtest", description=__doc__)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--reply-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    return asyncio.run(run(args.users, args.messages, args.reply_tokens))


if __name__ == "__main__":
    sys.exit(main())
