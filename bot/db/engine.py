"""The database engine and schema migrations.

SQLite gets WAL mode (readers never block the writer) and a busy timeout (a briefly locked
database waits instead of failing); every other URL (Postgres with asyncpg) is used as given.
The schema is Alembic's: the bot brings the database to head at start, so a first start on an
empty machine creates it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
SQLITE_BUSY_TIMEOUT_MS = 10_000


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if (
        parsed.get_backend_name() != "sqlite"
        or not parsed.database
        or parsed.database == ":memory:"
    ):
        return None
    return Path(parsed.database)


def create_engine(url: str) -> AsyncEngine:
    """An async engine; for SQLite, the folder is created and WAL + busy timeout are set."""
    sqlite_path = _sqlite_file(url)
    if sqlite_path is not None:
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, pool_pre_ping=sqlite_path is None)
    if make_url(url).get_backend_name() == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


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
