"""The Telegram bot: aiogram handlers, per-user memory in a database, the generation engine."""

import os

# OpenMP threads that finish their share of a matrix product wait for the others: by default
# they spin 300,000 times, then sleep. Spinning that long is a collapse on shared cores (a
# spinning thread burns the time its descheduled sibling needs); sleeping at once costs a
# wake-up at every one of a step's hundreds of small products (on a 2-core AVX512 machine two
# sleeping threads decoded no faster than one). So the bot's threads spin briefly (3,000 times,
# tens of microseconds: enough to span the gap between two products of a step) and the engine
# drops to fewer threads when its own measured steps say the cores are shared
# (bot.engine.threads has the figures). libgomp reads this once, when torch is first imported,
# so it is set here, before any module of the bot imports torch; an operator's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. docs/serving.md, "Threads on a shared CPU".
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")
