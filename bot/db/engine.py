"""The database engine and schema migrations.

SQLite gets WAL mode (readers never block the writer) and a busy timeout (a briefly locked
database waits instead of failing). Every statement is bounded by ``DATABASE_TIMEOUT_S``:
SQLite's busy timeout, and for PostgreSQL asyncpg's ``command_timeout`` and connect timeout. A
PostgreSQL connection whose server stops answering (a failover, a network partition that drops
packets instead of refusing them, a stopped server process) otherwise waits until the kernel
gives up on it (about a quarter of an hour behind a partition; never while the server's host
still acknowledges the packets), and with it the user whose message was being stored, and every
message after theirs. When a statement times out or the server cannot be reached, the other pooled
connections were opened the same way and are most likely dead too: :class:`Sessions` starts a
new pool, so the next statement connects afresh instead of finding them one timeout at a time
(measured with four pooled connections gone silent and a 1 s timeout: four failed
statements over 8 s before one succeeded, against one failure and success after 2 s).
The schema is Alembic's: the bot brings the database to head at start, so a first start on an
empty machine creates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bot.config import DEFAULT_DATABASE_TIMEOUT_S, DEFAULT_SQLITE_SYNCHRONOUS

#: What SQLITE_SYNCHRONOUS may be: never OFF (a crash of the machine could corrupt the file).
SQLITE_SYNCHRONOUS_MODES = ("FULL", "NORMAL")

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
#: What a database that cannot be reached raises: SQLAlchemy's OperationalError (SQLite locked,
#: PostgreSQL closing the connection), or asyncpg's own OSError (connection refused) and
#: TimeoutError (``command_timeout``), which SQLAlchemy passes on untranslated.
UNREACHABLE = (OperationalError, OSError)
#: SQLSTATE classes of a server going away or not ready: connection exceptions (08...), and an
#: operator's intervention (57P01 shut down, 57P02 crashed, 57P03 still starting up).
_GONE_SQLSTATES = ("08", "57P")


def database_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the database could not be reached or went away (a restart, a
    failover) rather than that the statement was wrong: worth trying again, and never a
    reason to acknowledge a Telegram update that was not stored."""
    if isinstance(error, UNREACHABLE):
        return True
    if isinstance(error, DBAPIError):
        sqlstate = getattr(error.orig, "sqlstate", None) or ""
        return error.connection_invalidated or sqlstate.startswith(_GONE_SQLSTATES)
    return False


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if (
        parsed.get_backend_name() != "sqlite"
        or not parsed.database
        or parsed.database == ":memory:"
    ):
        return None
    return Path(parsed.database)


def create_engine(
    url: str,
    timeout_s: float = DEFAULT_DATABASE_TIMEOUT_S,
    sqlite_synchronous: str = DEFAULT_SQLITE_SYNCHRONOUS,
) -> AsyncEngine:
    """An async engine whose statements wait at most ``timeout_s``; for SQLite, the folder is
    created and WAL, the busy timeout and ``sqlite_synchronous`` are set.

    ``synchronous``: in WAL mode, FULL (SQLite's default) syncs the log to disk at every commit,
    NORMAL only at checkpoints. Both survive the bot's process crashing or being killed at any
    moment (what a commit wrote is in the log file, which the operating system keeps); with
    NORMAL, an operating system crash or power loss can roll back the last commits, never
    corrupt the database (sqlite.org/pragma.html#pragma_synchronous). The sync was the largest
    part of storing a message here: NORMAL is the default, as Rails' SQLite defaults chose; an
    operator who wants each message on disk before it is answered sets FULL."""
    if sqlite_synchronous not in SQLITE_SYNCHRONOUS_MODES:
        raise ValueError(f"sqlite_synchronous must be one of {SQLITE_SYNCHRONOUS_MODES}")
    sqlite_path = _sqlite_file(url)
    if sqlite_path is not None:
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    parsed = make_url(url)
    connect_args = {}
    if parsed.get_backend_name() == "postgresql":  # an operator's own ?command_timeout= wins
        connect_args = {"command_timeout": timeout_s, "timeout": timeout_s}
        connect_args = {k: v for k, v in connect_args.items() if k not in parsed.query}
    engine = create_async_engine(url, pool_pre_ping=sqlite_path is None, connect_args=connect_args)
    if parsed.get_backend_name() == "sqlite":
        busy_timeout_ms = round(timeout_s * 1000)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


class Sessions:
    """``async_sessionmaker``'s two uses, ``async with sessions() as session`` (read) and
    ``async with sessions.begin() as session`` (one transaction), and a third,
    :meth:`single_statements`, with a fresh pool of connections after the database could not be
    reached (module docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._maker = async_sessionmaker(engine, expire_on_commit=False)
        # The same pool; its connections in PostgreSQL's autocommit while this session has them.
        self._autocommit = async_sessionmaker(
            engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
        )

    @contextlib.asynccontextmanager
    async def single_statements(self) -> AsyncIterator[AsyncSession]:
        """For work whose every statement stands alone (each one all or nothing by itself):
        on PostgreSQL each commits by itself, with no ``BEGIN`` and ``COMMIT`` around it, two
        round trips to the server fewer (a new message without facts is one such statement:
        a third of its store's trips). Elsewhere (SQLite: a transaction costs no trip to a
        server there) the same as :meth:`begin`."""
        if self.engine.dialect.name != "postgresql":
            async with self.begin() as session:
                yield session
            return
        async with self._fresh_pool_when_unreachable(), self._autocommit.begin() as session:
            yield session

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[AsyncSession]:
        async with self._fresh_pool_when_unreachable(), self._maker() as session:
            yield session

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncSession]:
        async with self._fresh_pool_when_unreachable(), self._maker.begin() as session:
            yield session

    @contextlib.asynccontextmanager
    async def _fresh_pool_when_unreachable(self) -> AsyncIterator[None]:
        try:
            yield
        except OSError as error:  # asyncpg's timeout or refused connection (UNREACHABLE)
            # Not closed: closing a connection to a server that does not answer waits too.
            # Dropped, the old connections are closed by the garbage collector.
            logger.warning("the database did not answer (%s); reconnecting", type(error).__name__)
            await self.engine.dispose(close=False)
            raise


def create_sessionmaker(engine: AsyncEngine) -> Sessions:
    return Sessions(engine)


def _alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    return config


def upgrade_to_head_sync(url: str) -> None:
    """``alembic upgrade head`` for this URL (runs its own event loop: call from a thread)."""
    from alembic import command

    sqlite_path = _sqlite_file(url)
    if sqlite_path is not None:
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(_alembic_config(url), "head")


async def upgrade_to_head(url: str) -> None:
    """Migrate without blocking the event loop (Alembic's async env starts its own loop)."""
    await asyncio.to_thread(upgrade_to_head_sync, url)
    logger.info("database schema is at head")
