"""Wiring: settings → database → model → dispatcher → polling. Everything is built here once.

Services reach handlers through aiogram's dependency injection (``Dispatcher(dialogue=...,
settings=...)``), never through globals; the model and the database are closed in
``dp.shutdown``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import UTC, datetime

from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    ClientDecodeError,
    TelegramAPIError,
    TelegramNetworkError,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.types import BotCommand, ErrorEvent, MenuButtonWebApp, User, WebAppInfo
from aiogram.webhook.aiohttp_server import SimpleRequestHandler, setup_application
from aiohttp import web
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot import texts
from bot.config import (
    DEFAULT_DATABASE_TIMEOUT_S,
    DEFAULT_SQLITE_SYNCHRONOUS,
    ConfigError,
    Settings,
)
from bot.conversation import Conversations
from bot.db.engine import (
    create_engine,
    create_sessionmaker,
    database_unreachable,
    upgrade_to_head,
)
from bot.diagnostics import install_task_dump
from bot.dialogue import DialogueService
from bot.engine.factory import open_backend
from bot.engine.generation import GenerationEngine
from bot.handlers import make_routers
from bot.metrics import BotMetrics, Health
from bot.middlewares.access import AccessMiddleware, CountUpdatesMiddleware
from bot.middlewares.lease_fence import LeaseFenceMiddleware
from bot.middlewares.rate_limit import (
    LocalWindowCounter,
    MessageRateLimit,
    RedisWindowCounter,
    WindowCounter,
)
from bot.middlewares.retry import RetryMiddleware
from bot.replicas import ReplicaCoordinator
from bot.webapp.api import WebAppApi
from models.errors import error_line

logger = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 3600.0


async def open_database(
    url: str,
    timeout_s: float = DEFAULT_DATABASE_TIMEOUT_S,
    sqlite_synchronous: str = DEFAULT_SQLITE_SYNCHRONOUS,
) -> AsyncEngine:
    """The database, migrated to the newest schema; one line (ConfigError, the password hidden)
    when it cannot be opened: a server not running, refused credentials, a missing database, a
    SQLite folder that cannot be made. It used to be a traceback."""
    engine: AsyncEngine | None = None
    try:
        engine = create_engine(url, timeout_s, sqlite_synchronous)  # makes a SQLite folder
        await upgrade_to_head(url)
        return engine
    except (OSError, DBAPIError) as error:
        if engine is not None:
            await engine.dispose()
        parsed = make_url(url)
        cause = error.orig if isinstance(error, DBAPIError) else error
        reason = error_line(cause)
        if isinstance(cause, OSError):  # "[Errno 111] Connect call failed" needs its name
            reason = f"{type(cause).__name__}: {reason}"
        check = (
            "can its folder be made and written?"
            if parsed.get_backend_name() == "sqlite"
            else "is the server running, and are the credentials and database name right?"
        )
        raise ConfigError(
            f"cannot open the database at DATABASE_URL="
            f"{parsed.render_as_string(hide_password=True)} ({reason}): "
            f"{check}"
        ) from None


async def open_services(settings: Settings) -> tuple[AsyncEngine, DialogueService]:
    """Migrate the database, open the model backend: what both front-ends need."""
    db_engine = await open_database(
        settings.database_url, settings.database_timeout_s, settings.sqlite_synchronous
    )
    try:
        backend = await open_backend(settings)
    except BaseException:
        await db_engine.dispose()
        raise
    return db_engine, DialogueService(create_sessionmaker(db_engine), backend, settings)


def build_bot(settings: Settings) -> Bot:
    token = settings.require_token()
    api = (
        TelegramAPIServer.from_base(settings.telegram_api_url)
        if settings.telegram_api_url
        else None
    )
    session = AiohttpSession(api=api) if api else AiohttpSession()
    session.middleware(RetryMiddleware())
    session.middleware(LeaseFenceMiddleware())  # inside the retries: each attempt is checked
    return Bot(token=token, session=session)


def build_dispatcher(
    dialogue: DialogueService,
    settings: Settings,
    db_engine: AsyncEngine,
    metrics: BotMetrics | None = None,
    replicas: ReplicaCoordinator | None = None,
    online_since: datetime | None = None,
) -> Dispatcher:
    """The dispatcher and its life cycle. Handlers hand each message to one
    :class:`bot.conversation.Conversations`, which owns its life; with ``replicas``
    (REDIS_URL) it answers under each user's lease, and its sweep replaces the start-up pass
    over unanswered messages. ``online_since``: when this process started (default now); a
    message Telegram held from before it is answered only while recent
    (``bot.conversation.held_too_long``)."""
    metrics = metrics or BotMetrics()
    metrics.watch_queue(lambda: dialogue.backend.queue_depth)
    if isinstance(dialogue.backend, GenerationEngine):
        engine = dialogue.backend
        metrics.watch_engine(
            lambda: engine.worker_threads,
            lambda: engine.openmp_stalls,
            lambda: engine.active_rows,
        )
    # Answering under the users' leases begins when the dispatcher starts, with the sweep (as
    # the owed replies' drain always has): a dispatcher fed updates without being started (the
    # handler tests) answers in line, with only the shared rate limit on Redis.
    conversations = Conversations(
        dialogue, metrics, settings, None, online_since or datetime.now(UTC)
    )
    counter: WindowCounter | None = None
    if settings.rate_limit_messages:
        window = settings.rate_limit_window_s
        counter = (
            RedisWindowCounter(replicas.redis, window)
            if replicas is not None
            else LocalWindowCounter(window)
        )
    # the page (bot.webapp) shares the conversations and the rate limit's count
    dp = Dispatcher(
        dialogue=dialogue,
        settings=settings,
        metrics=metrics,
        conversations=conversations,
        rate_counter=counter,
    )
    dp.update.outer_middleware(CountUpdatesMiddleware(metrics))
    dp.message.outer_middleware(AccessMiddleware(settings.allowed_ids, settings.blocked_ids))
    if counter is not None:
        dp.message.middleware(
            MessageRateLimit(
                settings.rate_limit_messages, window, counter, metrics, settings.admin_ids
            )
        )
    dp.include_routers(*make_routers())
    background: list[asyncio.Task[None]] = []

    async def on_error(event: ErrorEvent) -> bool:
        """Log the failure (the token is redacted by the logging filter), apologise, go on.

        No apology when it was Telegram that failed past every retry: the message stays owed
        and its reply comes later (the next start, another replica's sweep), and an apology
        sent once Telegram is back would stand beside that reply.

        With replicas (the webhook answers once the update is handled), the database
        unreachable past the retries: raised again, so that the webhook answers 5xx and
        Telegram delivers the update again (answered 200, the message was lost). A single
        process acknowledged the update before handling it: the apology is all it can do."""
        metrics.errors.inc()
        if replicas is not None and database_unreachable(event.exception):
            logger.warning(
                "update %s not handled, the database is unreachable (%s): Telegram will "
                "deliver it again",
                event.update.update_id,
                type(event.exception).__name__,
            )
            raise event.exception
        logger.error(
            "error while handling update %s", event.update.update_id, exc_info=event.exception
        )
        message = event.update.message
        telegram_failed = isinstance(event.exception, TelegramNetworkError | TelegramServerError)
        if message is not None and not telegram_failed:
            try:
                await message.answer(texts.ERROR)
            except TelegramAPIError:
                logger.warning("could not send the apology for update %s", event.update.update_id)
        return True

    async def prune_forever() -> None:
        while True:
            try:
                removed = await dialogue.prune(settings.retention_days)
                if removed:
                    logger.info("retention: pruned %d old messages", removed)
            except Exception:
                logger.exception("retention pruning failed")
            await asyncio.sleep(RETENTION_INTERVAL_S)

    async def on_startup(bot: Bot) -> None:
        commands = [BotCommand(command=c, description=d) for c, d in texts.COMMANDS.items()]
        try:
            await bot.set_my_commands(commands)
        except TelegramAPIError as error:  # the menu is a convenience: never a reason to stop
            logger.warning("could not register the command menu: %s", error)
        if settings.webapp_url:
            button = MenuButtonWebApp(
                text=texts.WEBAPP_BUTTON, web_app=WebAppInfo(url=settings.webapp_url)
            )
            try:
                await bot.set_chat_menu_button(menu_button=button)
            except TelegramAPIError as error:
                logger.warning("could not set the Mini App's menu button: %s", error)
        if settings.retention_days > 0:
            background.append(asyncio.create_task(prune_forever()))
        if replicas is not None:
            conversations.replicas = replicas
            background.append(asyncio.create_task(conversations.sweep_forever(bot)))
            return
        # Before the first update: what the last run left unanswered goes first, in order.
        background.extend(await conversations.answer_unanswered(bot))

    async def on_shutdown() -> None:
        for task in background:
            task.cancel()
        await conversations.aclose()
        await dialogue.backend.aclose()
        if replicas is not None:
            await replicas.aclose()
        await db_engine.dispose()
        logger.info("stopped: model released, database closed")

    dp.errors.register(on_error)
    dp.startup.register(on_startup)
    dp.shutdown.register(on_shutdown)
    return dp


def build_web_app(health: Health, metrics: BotMetrics) -> web.Application:
    """``GET /healthz`` (200 ready / 503 not yet) and ``GET /metrics`` (Prometheus text)."""

    async def healthz(request: web.Request) -> web.Response:
        state = await health.check()
        return web.json_response(state, status=200 if all(state.values()) else 503)

    async def metrics_view(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    return app


async def _serve(
    app: web.Application, settings: Settings, port: int | None = None
) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(
        runner, settings.listen_host, port or settings.health_port or settings.listen_port
    ).start()
    return runner


async def whoami(bot: Bot, settings: Settings) -> User:
    """The bot's own account (getMe), asked before the slow model load: a token Telegram
    refuses, or a Bot API that cannot be reached, is one line at once rather than a traceback
    once the model has loaded. The token never appears in the line."""
    token = settings.require_token()
    where = settings.telegram_api_url or "https://api.telegram.org"
    try:
        return await bot.get_me()
    except TelegramUnauthorizedError:
        raise ConfigError(
            "TELEGRAM_BOT_TOKEN was refused by the Bot API (401 Unauthorized): copy the token "
            "again from @BotFather (/mybots), it may have been revoked"
        ) from None
    except TelegramNetworkError as error:
        reason = error.message.replace(token, "<token>")
        raise ConfigError(
            f"cannot reach the Telegram Bot API at {where} ({reason}): check the network "
            "(or TELEGRAM_API_URL)"
        ) from None
    except (TelegramAPIError, ClientDecodeError) as error:  # e.g. a URL ending in /bot: 404
        reason = error_line(error).replace(token, "<token>")
        raise ConfigError(
            f"the Bot API at {where} did not answer getMe as Telegram does "
            f"({type(error).__name__}: {reason}): TELEGRAM_API_URL is the server's base URL, "
            "e.g. http://127.0.0.1:8081, without /bot<token>"
        ) from None


async def run_bot(settings: Settings) -> None:
    """Start everything; long polling, or a webhook server when WEBHOOK_URL is set."""
    online_since = datetime.now(UTC)  # messages sent before it waited for a bot that was down
    install_task_dump()  # kill -USR1 <pid>: where each task waits (bot.diagnostics)
    bot = build_bot(settings)
    try:
        me = await whoami(bot, settings)  # before the slow model load
    except BaseException:
        await bot.session.close()
        raise
    health, metrics = Health(), BotMetrics()
    app = build_web_app(health, metrics)
    webhook = bool(settings.webhook_url)
    runner = None
    secret = settings.require_webhook_secret()
    # Polling mode serves the page on WEBAPP_PORT once the model is loaded; when that is also
    # HEALTH_PORT, the one server starts then (answering 503 while loading needs it earlier).
    page_port = settings.webapp_port if not webhook else 0
    if not webhook and settings.health_port and settings.health_port != page_port:
        runner = await _serve(app, settings)  # answers 503 while the model loads
    replicas = None
    if settings.redis_url is not None:
        replicas = await ReplicaCoordinator.connect(
            settings.redis_url.get_secret_value(),
            lease_s=settings.replica_lease_s,
            wait_s=max(4 * settings.replica_lease_s, 2 * settings.request_timeout_s),
        )
        health.redis = replicas.redis
    db_engine, dialogue = await open_services(settings)
    if replicas is not None:
        replicas.fence = dialogue  # each lease's fencing token, kept where Redis's loss is not
    health.db, health.model_ready = db_engine, True
    dp = build_dispatcher(dialogue, settings, db_engine, metrics, replicas, online_since)
    page = WebAppApi(bot, dp["conversations"], settings, dp["rate_counter"])
    page_runner = None
    if page_port:
        page_app = app if settings.health_port == page_port else build_web_app(health, metrics)
        page.register(page_app)
        page_runner = await _serve(page_app, settings, page_port)
        logger.info("the Mini App's page on http://%s:%d/app/", settings.listen_host, page_port)
    if not webhook:
        # A webhook left registered by an earlier run in webhook mode makes Telegram refuse
        # every getUpdates (409): the bot would poll in vain and never answer.
        registered = await bot.get_webhook_info()
        if registered.url:
            logger.warning(
                "a webhook is registered for this bot (%s, %d updates waiting): deleting it to "
                "poll instead (set WEBHOOK_URL to use webhook mode)",
                registered.url,
                registered.pending_update_count,
            )
            await bot.delete_webhook(drop_pending_updates=False)
        logger.info("polling as @%s", me.username)
        try:
            await dp.start_polling(
                bot,
                handle_as_tasks=True,
                tasks_concurrency_limit=settings.polling_concurrency,
                handle_signals=True,
                close_bot_session=True,
            )
        finally:
            for server in (runner, page_runner):
                if server is not None:
                    await server.cleanup()
        return
    # With replicas the update is stored before it is acknowledged (bot.replicas): Telegram
    # sends the chat's next update only then, so stored order is sent order across replicas.
    SimpleRequestHandler(
        dispatcher=dp, bot=bot, secret_token=secret, handle_in_background=replicas is None
    ).register(app, path=settings.webhook_path)
    setup_application(app, dp, bot=bot)
    page.register(app)
    runner = await _serve(app, settings)
    await bot.set_webhook(
        url=settings.webhook_url or "",
        secret_token=secret,
        allowed_updates=dp.resolve_used_update_types(),
    )
    logger.info(
        "webhook mode as @%s on %s:%d", me.username, settings.listen_host, settings.listen_port
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()  # runs dp.shutdown: model released, database closed
