"""Prometheus metrics and the health state, served at ``/metrics`` and ``/healthz``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


class BotMetrics:
    """Counters for one bot process (its own registry, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.started = time.monotonic()
        self.updates = Counter("bot_updates", "Telegram updates received", registry=self.registry)
        self.replies = Counter("bot_replies", "model replies sent", registry=self.registry)
        self.errors = Counter("bot_errors", "updates whose handling failed", registry=self.registry)
        self.busy = Counter(
            "bot_busy", "messages refused: queue full or timeout", registry=self.registry
        )
        self.throttled = Counter(
            "bot_throttled", "messages dropped: the sender's rate limit", registry=self.registry
        )
        self.generation_seconds = Histogram(
            "bot_generation_seconds",
            "time from a user's message to the model's reply",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "bot_queue_depth", "requests waiting for the model", registry=self.registry
        )
        self.page_generations = Gauge(
            "bot_webapp_generations",
            "replies being generated for the Mini App's page now",
            registry=self.registry,
        )

    def count(self, name: str) -> int:
        """A counter's value since the start (``name`` without Prometheus' ``_total``)."""
        return int(self.registry.get_sample_value(f"{name}_total") or 0)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def watch_engine(
        self,
        threads: Callable[[], int],
        stalls: Callable[[], int],
        rows: Callable[[], int] | None = None,
    ) -> None:
        """Show the local engine's thread count, OpenMP stalls and the rows it is decoding
        now (none with a remote model server)."""
        if rows is not None:
            Gauge(
                "bot_engine_active_rows",
                "replies the engine is generating now (a stopped one leaves at its next step)",
                registry=self.registry,
            ).set_function(rows)
        Gauge(
            "bot_engine_threads",
            "threads the engine decodes with (fewer while the cores are shared)",
            registry=self.registry,
        ).set_function(threads)
        Gauge(
            "bot_engine_openmp_stalls",
            "times decoding was found waiting on another thread's OpenMP pool (see the log)",
            registry=self.registry,
        ).set_function(stalls)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Health:
    """Ready when the model is loaded and the database answers (and Redis, with replicas)."""

    def __init__(self) -> None:
        self.model_ready = False
        self.db: AsyncEngine | None = None
        self.redis: Any = None  # redis.asyncio.Redis when replicas share users

    async def check(self) -> dict[str, bool]:
        database = False
        if self.db is not None:
            try:
                async with self.db.connect() as connection:
                    await connection.execute(text("SELECT 1"))
                database = True
            except Exception:
                database = False
        state = {"model": self.model_ready, "database": database}
        if self.redis is not None:
            try:
                state["redis"] = bool(await self.redis.ping())
            except Exception:
                state["redis"] = False
        return state
