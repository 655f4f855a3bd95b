"""The Mini App's page and its JSON API, on the bot's own aiohttp server.

Routes (all under ``/app/``):

- ``GET /app/``: the page (plain HTML, CSS and JavaScript from ``static/``, no build step);
- ``GET api/me``, ``GET api/messages?before=ID``: who is asking, and their conversation, newest
  first, a page at a time;
- ``POST api/messages`` (``{"text": ...}``), ``POST api/regenerate``: a reply streamed as
  newline-delimited JSON while it is generated; the page's Stop closes the request, and the
  generation is cancelled with it (what was shown is kept as the reply);
- ``GET api/memory``, ``DELETE api/memory/facts/{id}``, ``PUT api/settings``: the facts the bot
  keeps (each deletable) and the settings (``/temp``'s temperature, memory on or off).

Every API request names its user only through Telegram's signed launch data
(:mod:`bot.webapp.auth`); everything is scoped to that user. The allowlist, the blocks and the
per-user rate limit that apply in Telegram apply here. No CORS headers (the page calls its own
origin), no cookies; request bodies are capped; the page may be framed by Telegram's web clients
only (``frame-ancestors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiogram import Bot
from aiohttp import web

from bot import texts
from bot.config import Settings
from bot.conversation import Conversations, PageReply
from bot.dialogue import DialogueService, TemperatureError, UserRef, parse_temperature
from bot.facts import KINDS
from bot.middlewares.rate_limit import WindowCounter
from bot.webapp.auth import AuthError, PageUser, authenticate

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
PREFIX = "/app"
#: Messages the conversation view gets per request.
PAGE_SIZE = 30
#: How often a streamed reply's connection is checked for a page that went away.
GONE_CHECK_S = 0.25

#: Telegram's web clients, the only pages that may frame the Mini App.
TELEGRAM_FRAMES = "https://web.telegram.org https://*.telegram.org"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' https://telegram.org; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    f"form-action 'none'; frame-ancestors 'self' {TELEGRAM_FRAMES}"
)

USER_KEY = web.AppKey("webapp_user", PageUser)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, text: str) -> web.Response:
    return web.json_response({"error": code, "text": text}, status=status)


class WebAppApi:
    """The page's routes over the bot's services (the same ones Telegram's updates use)."""

    def __init__(
        self,
        bot: Bot,
        conversations: Conversations,
        settings: Settings,
        counter: WindowCounter | None,
    ) -> None:
        self.bot, self.conversations, self.settings = bot, conversations, settings
        self.dialogue: DialogueService = conversations.dialogue
        self.counter = counter
        self.token = settings.require_token()

    def register(self, app: web.Application) -> None:
        app.middlewares.append(self._headers)
        app.router.add_get(PREFIX, self._to_page)
        app.router.add_get(f"{PREFIX}/", self._page)
        for name in ("app.js", "app.css"):
            app.router.add_get(f"{PREFIX}/{name}", self._static(name))
        api = f"{PREFIX}/api"
        app.router.add_get(f"{api}/me", self._authed(self.me))
        app.router.add_get(f"{api}/messages", self._authed(self.messages))
        app.router.add_post(f"{api}/messages", self._authed(self.send))
        app.router.add_post(f"{api}/regenerate", self._authed(self.regenerate))
        app.router.add_get(f"{api}/memory", self._authed(self.memory))
        app.router.add_delete(f"{api}/memory/facts/{{fact_id}}", self._authed(self.forget_fact))
        app.router.add_put(f"{api}/settings", self._authed(self.change_settings))

    # -- the page ------------------------------------------------------------------------------

    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The page's security headers; API answers are never cached."""
        response = await handler(request)
        if request.path.startswith(PREFIX):
            response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            if request.path.startswith(f"{PREFIX}/api/"):
                response.headers["Cache-Control"] = "no-store"
        return response

    async def _to_page(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{PREFIX}/")

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def _static(self, name: str) -> Handler:
        async def serve(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

        return serve

    # -- who is asking -------------------------------------------------------------------------

    def _authed(self, handler: Handler) -> Handler:
        """``handler`` for the user in the request's launch data: 401 without valid launch
        data, 403 for whom the bot does not talk to in Telegram, 413 for a body over the cap."""

        async def checked(request: web.Request) -> web.StreamResponse:
            try:
                user = authenticate(
                    self.token,
                    request.headers.get("Authorization"),
                    self.settings.webapp_auth_max_age_s,
                )
            except AuthError as error:
                return _error(401, "reopen", f"{texts.WEBAPP_REOPEN} ({error})")
            if user.telegram_id in self.settings.blocked_ids:
                return _error(403, "blocked", texts.WEBAPP_NOT_ALLOWED)
            allowed = self.settings.allowed_ids
            if allowed and user.telegram_id not in allowed:
                return _error(403, "not_allowed", texts.NOT_ALLOWED)
            length = request.content_length
            if length is not None and length > self.settings.webapp_max_body_bytes:
                return _error(413, "too_large", texts.WEBAPP_TOO_LONG)
            request[USER_KEY] = user
            return await handler(request)

        return checked

    @staticmethod
    def _user(request: web.Request) -> UserRef:
        page_user = request[USER_KEY]
        return UserRef(page_user.telegram_id, page_user.name)

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object, read up to the cap (a body sent without a length, too)."""
        cap, raw = self.settings.webapp_max_body_bytes, b""
        while len(raw) <= cap:  # read() gives what has arrived: a body comes in chunks
            chunk = await request.content.read(cap + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
        if len(raw) > cap:
            raise web.HTTPRequestEntityTooLarge(max_size=cap, actual_size=len(raw))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise web.HTTPBadRequest(text="the body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="the body is not a JSON object")
        return body

    # -- reading -------------------------------------------------------------------------------

    async def me(self, request: web.Request) -> web.StreamResponse:
        user = self._user(request)
        enabled, _ = await self.dialogue.memory(user)
        return web.json_response(
            {
                "id": user.telegram_id,
                "name": user.name,
                "temperature": await self.dialogue.get_temperature(user),
                "temperature_min": self.settings.temperature_min,
                "temperature_max": self.settings.temperature_max,
                "memory": enabled,
                "max_chars": self.settings.max_message_chars,
            }
        )

    async def messages(self, request: web.Request) -> web.StreamResponse:
        before_raw = request.query.get("before")
        try:
            before = int(before_raw) if before_raw else None
        except ValueError:
            return _error(400, "bad_request", "before: a message id")
        user = self._user(request)
        shown = await self.dialogue.conversation(user, before, PAGE_SIZE + 1)
        return web.json_response(
            {
                # on the newest page: whether Regenerate has a reply of the page's to redo
                "regenerable": before is None and await self.dialogue.page_regenerable(user),
                "messages": [
                    {
                        "id": m.id,
                        "role": m.role,
                        "text": m.text,
                        "at": m.created_at.isoformat(timespec="seconds"),
                    }
                    for m in shown[:PAGE_SIZE]
                ],
                "more": len(shown) > PAGE_SIZE,
            }
        )

    async def memory(self, request: web.Request) -> web.StreamResponse:
        enabled, facts = await self.dialogue.memory(self._user(request))
        return web.json_response(
            {
                "enabled": enabled,
                "facts": [
                    {"id": i, "kind": kind, "label": KINDS.get(kind, kind), "value": value}
                    for i, kind, value in facts
                ],
            }
        )

    # -- changing ------------------------------------------------------------------------------

    async def forget_fact(self, request: web.Request) -> web.StreamResponse:
        try:
            fact_id = int(request.match_info["fact_id"])
        except ValueError:
            return _error(400, "bad_request", "a fact id")
        if not await self.dialogue.forget_fact(self._user(request), fact_id):
            return _error(404, "not_found", texts.MEMORY_GONE)
        return web.Response(status=204)

    async def change_settings(self, request: web.Request) -> web.StreamResponse:
        """``{"temperature": 0.7}`` and/or ``{"memory": false}``; a bad value changes nothing
        (both are checked before either is kept)."""
        user, body = self._user(request), await self._json_body(request)
        temperature = body.get("temperature")
        memory = body.get("memory")
        value: float | None = None
        if temperature is not None:
            low, high = self.settings.temperature_min, self.settings.temperature_max
            try:
                value = parse_temperature(str(temperature), low, high)
            except TemperatureError as error:
                return _error(400, "bad_temperature", str(error))
        if memory is not None and not isinstance(memory, bool):
            return _error(400, "bad_memory", "memory: true or false")
        if value is not None:
            await self.dialogue.set_temperature(user, value)
        if memory is not None:
            await self.dialogue.set_memory(user, memory)
        return await self.me(request)

    # -- replies -------------------------------------------------------------------------------

    async def _over_limit(self, user: UserRef) -> web.Response | None:
        """The per-user rate limit of Telegram messages, on the page's generations too."""
        limit = self.settings.rate_limit_messages
        if not limit or self.counter is None or user.telegram_id in self.settings.admin_ids:
            return None
        if await self.counter.hit(user.telegram_id) <= limit:
            return None
        window = f"{self.settings.rate_limit_window_s:g}"
        return _error(429, "too_many", texts.TOO_MANY.format(limit=limit, seconds=window))

    async def send(self, request: web.Request) -> web.StreamResponse:
        user, body = self._user(request), await self._json_body(request)
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            return _error(400, "empty", texts.WEBAPP_EMPTY)
        refused = await self._over_limit(user)
        if refused is not None:
            return refused
        text = text.strip()
        return await self._stream(
            request,
            lambda show: self.conversations.receive_from_page(self.bot, user, text, show),
        )

    async def regenerate(self, request: web.Request) -> web.StreamResponse:
        user = self._user(request)
        refused = await self._over_limit(user)
        if refused is not None:
            return refused
        return await self._stream(
            request, lambda show: self.conversations.regenerate_on_page(self.bot, user, show)
        )

    async def _stream(
        self,
        request: web.Request,
        answer: Callable[[Callable[[str], None]], Awaitable[PageReply | None]],
    ) -> web.StreamResponse:
        """Run ``answer`` and stream its reply as newline-delimited JSON: ``{"text": ...}``
        as it grows (only the newest text is sent), then ``{"done": true, ...}``. When the page
        goes away (Stop, a closed page) the answer is cancelled, so the engine drops its row."""
        latest: list[str] = []
        changed = asyncio.Event()

        def show(text: str) -> None:
            latest[:] = [text]
            changed.set()

        task = asyncio.create_task(answer(show))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        sent = ""
        try:
            while not task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), GONE_CHECK_S)
                changed.clear()
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("the page went away")
                if latest and latest[0] != sent:
                    sent = latest[0]
                    await response.write(_line({"text": sent}))
            try:
                reply = task.result()
            except Exception:
                logger.exception("user %s: the page's reply failed", request[USER_KEY].telegram_id)
                await response.write(_line({"done": True, "error": "failed", "text": texts.ERROR}))
                await response.write_eof()
                return response
            if reply is None:
                await response.write(
                    _line({"done": True, "error": "not_regenerable", "text": texts.WEBAPP_NO_REGEN})
                )
            else:
                await response.write(
                    _line({"done": True, "text": reply.text, "stored": reply.stored})
                )
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            logger.info("user %s: reply stopped by the page", request[USER_KEY].telegram_id)
        finally:
            if not task.done():
                task.cancel()
        return response


def _line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()
