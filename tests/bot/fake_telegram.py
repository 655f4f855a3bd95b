"""A fake Telegram Bot API server on 127.0.0.1, for running the real bot process in tests.

It speaks the HTTP shape aiogram uses (``POST /bot<token>/<method>`` with form fields) and keeps
what the bot sent, so tests can assert on it as a user would see it. getUpdates implements long
polling with offset semantics: updates below the offset are confirmed and dropped, and a call with
nothing pending waits up to its ``timeout`` for the next update.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

BOT_USER = {"id": 42, "is_bot": True, "first_name": "Тестбот", "username": "test_bot"}


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float = field(default_factory=time.monotonic)
    ok: bool = True  # False when the server answered it with an injected fault


class FakeTelegram:
    def __init__(self, token: str) -> None:
        self.token = token
        self.calls: list[Call] = []
        self.pending: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1000)
        self._new_update = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.faults: dict[str, list[int]] = {}  # method -> HTTP statuses to answer next
        self.held: dict[str, asyncio.Event] = {}  # method -> released when set
        self.failing_until: dict[str, tuple[float, int]] = {}  # method -> (until, status)
        self.delivered: dict[int, dict[str, Any]] = {}  # update id -> the update, once sent
        self._closing = False
        self._forced: list[dict[str, Any]] = []
        self.shown: dict[int, str] = {}  # message id -> its text now (after the bot's edits)
        self._webhook: tuple[str, str] | None = None  # (url, secret) once delivering
        self._http: aiohttp.ClientSession | None = None
        self._chat_queues: dict[int, list[dict[str, Any]]] = {}
        self.group_admins: set[tuple[int, int]] = set()  # (group, user): getChatMember's creator
        # The webhook Telegram has on record (setWebhook, deleteWebhook): while there is one,
        # getUpdates is refused with 409, as Telegram does.
        self.registered_webhook: str | None = None
        self._chat_workers: dict[int, asyncio.Task[None]] = {}
        self.webhook_attempts = 0  # POSTs to the webhook, failed ones included
        # sendMessageDraft: like a Bot API server older than 9.3 unless a test offers it. An
        # offered draft is shown (chat id -> text) until a message is sent to its chat.
        self.drafts_offered = False
        self.drafts_shown: dict[int, str] = {}

    def fail_next(self, method: str, *statuses: int) -> None:
        """Answer the next calls of ``method`` with these errors (429 asks to retry after 1 s)."""
        self.faults.setdefault(method, []).extend(statuses)

    def fail_for(self, seconds: float, *methods: str, status: int = 502) -> None:
        """Answer every call of ``methods`` with ``status`` for the next ``seconds`` (Telegram
        down for a while, whatever the bot's retries)."""
        until = time.monotonic() + seconds
        for method in methods:
            self.failing_until[method] = (until, status)

    def hold(self, method: str) -> None:
        """Leave calls of ``method`` unanswered (Telegram hanging) until :meth:`release`; a held
        call never takes effect, as if Telegram had been down."""
        self.held[method] = asyncio.Event()

    def release(self, method: str) -> None:
        self.held.pop(method).set()

    def redeliver(self, update_id: int, *, now: bool = False) -> None:
        """Offer an update again, as Telegram does when it has not seen it acknowledged: to the
        next poll without an offset (a restarted bot), or with ``now`` to the very next poll
        whatever its offset (the running bot gets it a second time)."""
        (self._forced if now else self.pending).append(self.delivered[update_id])
        self._new_update.set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    def deliver_to(self, url: str, secret: str, *, own_network: bool = False) -> None:
        """Push updates to a webhook from now on, as Telegram does: a chat's updates one at a
        time, the next only once the previous was answered with 200; one that was not (an
        error, a refused connection, a replica killed mid-request) is sent again shortly.
        ``url`` must be on 127.0.0.1: tests never send traffic anywhere else, except, with
        ``own_network``, inside the container network a test made itself (compose e2e)."""
        assert own_network or url.startswith("http://127.0.0.1:"), url
        self._webhook = (url, secret)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        for update in self.pending:
            self._push(update)
        self.pending = []

    def _push(self, update: dict[str, Any]) -> None:
        chat_id = update["message"]["chat"]["id"]
        self._chat_queues.setdefault(chat_id, []).append(update)
        worker = self._chat_workers.get(chat_id)
        if worker is None or worker.done():
            self._chat_workers[chat_id] = asyncio.create_task(self._deliver_chat(chat_id))

    async def _deliver_chat(self, chat_id: int) -> None:
        assert self._webhook is not None and self._http is not None
        url, secret = self._webhook
        queue = self._chat_queues[chat_id]
        while queue and not self._closing:
            self.webhook_attempts += 1
            try:
                async with self._http.post(
                    url, json=queue[0], headers={"X-Telegram-Bot-Api-Secret-Token": secret}
                ) as response:
                    delivered = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                delivered = False
            if delivered:
                queue.pop(0)
            else:
                await asyncio.sleep(0.2)

    def webhook_backlog(self) -> int:
        """Updates not yet acknowledged by the webhook."""
        return sum(len(queue) for queue in self._chat_queues.values())

    @staticmethod
    async def _health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stop(self) -> None:
        """Answer the calls still waiting (long polls, held calls) and close: a bot killed
        mid-poll would otherwise keep the server's shutdown waiting out its poll timeout."""
        self._closing = True
        self._new_update.set()
        for event in self.held.values():
            event.set()
        for worker in self._chat_workers.values():
            worker.cancel()
        await asyncio.gather(*self._chat_workers.values(), return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- what a user does -------------------------------------------------------------------

    @staticmethod
    def update(update_id: int, user_id: int, chat_id: int | None = None, **content: Any) -> dict:
        """An update as Telegram sends it; a negative ``chat_id`` makes it a group message."""
        chat_id = user_id if chat_id is None else chat_id
        chat = (
            {"id": chat_id, "type": "private", "first_name": f"User{user_id}"}
            if chat_id > 0
            else {"id": chat_id, "type": "group", "title": "Группа"}
        )
        return {
            "update_id": update_id,
            "message": {
                "message_id": 10_000 + update_id,
                "date": int(time.time()),
                "chat": chat,
                "from": {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"},
                **content,
            },
        }

    def _message(self, user_id: int, chat_id: int | None = None, **content: Any) -> int:
        update_id = next(self._update_ids)
        self.delivered[update_id] = self.update(update_id, user_id, chat_id, **content)
        if self._webhook is not None:
            self._push(self.delivered[update_id])
            return update_id
        self.pending.append(self.delivered[update_id])
        self._new_update.set()
        return update_id

    @staticmethod
    def text_content(text: str) -> dict[str, Any]:
        entities = []
        if text.startswith("/"):
            entities = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        return {"text": text, "entities": entities}

    def send_text(self, user_id: int, text: str, chat_id: int | None = None, **extra: Any) -> int:
        return self._message(user_id, chat_id, **self.text_content(text), **extra)

    def send_sticker(self, user_id: int) -> int:
        sticker = {
            "file_id": "s1",
            "file_unique_id": "u1",
            "type": "regular",
            "width": 512,
            "height": 512,
            "is_animated": False,
            "is_video": False,
        }
        return self._message(user_id, sticker=sticker)

    # --- what the bot did ---------------------------------------------------------------------

    def sent_to(self, chat_id: int) -> list[str]:
        """The bot's messages in the chat as the user sees them now, that is after any edits
        (refused attempts do not count)."""
        return [
            self.shown.get(c.params.get("message_id", -1), c.params["text"])
            for c in self.calls
            if c.method == "sendMessage" and c.ok and int(c.params["chat_id"]) == chat_id
        ]

    def edits_to(self, chat_id: int) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.method == "editMessageText" and c.ok and int(c.params["chat_id"]) == chat_id
        ]

    def count(self, method: str) -> int:
        return sum(1 for c in self.calls if c.method == method)

    async def wait_for(self, predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; calls so far: {[c.method for c in self.calls]}")
            await asyncio.sleep(0.05)

    async def wait_replies(self, chat_id: int, count: int, timeout: float = 60.0) -> list[str]:
        await self.wait_for(lambda: len(self.sent_to(chat_id)) >= count, timeout)
        return self.sent_to(chat_id)

    # --- the API ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401
            )
        method = request.match_info["method"]
        params: dict[str, Any] = dict(await request.post()) if request.can_read_body else {}
        params.update(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        self.calls.append(Call(method, params))
        if method in self.held:
            self.calls[-1].ok = False
            await self.held[method].wait()
            return web.json_response(
                {"ok": False, "error_code": 502, "description": "held"}, status=502
            )
        until, failing = self.failing_until.get(method, (0.0, 0))
        if time.monotonic() < until:
            self.faults.setdefault(method, []).insert(0, failing)
        if self.faults.get(method):
            status = self.faults[method].pop(0)
            self.calls[-1].ok = False
            body: dict[str, Any] = {"ok": False, "error_code": status, "description": "fault"}
            if status == 429:
                body.update(
                    description="Too Many Requests: retry after 1", parameters={"retry_after": 1}
                )
            return web.json_response(body, status=status)
        if method == "getUpdates" and self.registered_webhook:
            self.calls[-1].ok = False
            return web.json_response(
                {
                    "ok": False,
                    "error_code": 409,
                    "description": "Conflict: can't use getUpdates method while webhook is "
                    "active; use deleteWebhook to delete the webhook first",
                },
                status=409,
            )
        handler = getattr(self, f"_api_{method}", None)
        if method == "sendMessageDraft" and not self.drafts_offered:
            handler = None
        if handler is None:
            self.calls[-1].ok = False
            return web.json_response(
                {"ok": False, "error_code": 404, "description": f"Not Found: {method}"}, status=404
            )
        return web.json_response({"ok": True, "result": await handler(params)})

    async def _api_getMe(self, params: dict[str, Any]) -> Any:
        return BOT_USER

    async def _api_getUpdates(self, params: dict[str, Any]) -> Any:
        offset = int(params.get("offset") or 0)
        self.pending = [u for u in self.pending if u["update_id"] >= offset]
        if self._forced:
            forced, self._forced = self._forced, []
            return forced
        if not self.pending and not self._closing:
            self._new_update.clear()
            try:
                await asyncio.wait_for(self._new_update.wait(), float(params.get("timeout") or 0))
            except TimeoutError:
                return []
        return [u for u in self.pending if u["update_id"] >= offset][
            : int(params.get("limit") or 100)
        ]

    async def _api_sendMessage(self, params: dict[str, Any]) -> Any:
        chat_id = int(params["chat_id"])
        self.drafts_shown.pop(chat_id, None)  # a message ends the chat's draft
        params["message_id"] = next(self._message_ids)
        self.shown[params["message_id"]] = params["text"]
        return {
            "message_id": params["message_id"],
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "group"},
            "from": BOT_USER,
            "text": params["text"],
        }

    async def _api_sendMessageDraft(self, params: dict[str, Any]) -> Any:
        self.drafts_shown[int(params["chat_id"])] = params["text"]
        return True

    def drafts_to(self, chat_id: int) -> list[str]:
        return [
            c.params["text"]
            for c in self.calls
            if c.method == "sendMessageDraft" and c.ok and int(c.params["chat_id"]) == chat_id
        ]

    async def _api_editMessageText(self, params: dict[str, Any]) -> Any:
        chat_id, message_id = int(params["chat_id"]), int(params["message_id"])
        if message_id not in self.shown:
            raise web.HTTPBadRequest(text="message to edit not found")
        self.shown[message_id] = params["text"]
        return {
            "message_id": message_id,
            "date": int(time.time()),
            "edit_date": int(time.time()),
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "group"},
            "from": BOT_USER,
            "text": params["text"],
        }

    async def _api_getChatMember(self, params: dict[str, Any]) -> Any:
        chat_id, user_id = int(params["chat_id"]), int(params["user_id"])
        user = {"id": user_id, "is_bot": False, "first_name": f"user{user_id}"}
        if (chat_id, user_id) in self.group_admins:
            return {"status": "creator", "user": user, "is_anonymous": False}
        return {"status": "member", "user": user}

    async def _api_sendChatAction(self, params: dict[str, Any]) -> Any:
        return True

    async def _api_setMyCommands(self, params: dict[str, Any]) -> Any:
        commands = params.get("commands")
        if isinstance(commands, str):
            params["commands"] = json.loads(commands)
        return True

    async def _api_setChatMenuButton(self, params: dict[str, Any]) -> Any:
        button = params.get("menu_button")
        if isinstance(button, str):
            params["menu_button"] = json.loads(button)
        return True

    async def _api_deleteWebhook(self, params: dict[str, Any]) -> Any:
        self.registered_webhook = None
        return True

    async def _api_setWebhook(self, params: dict[str, Any]) -> Any:
        self.registered_webhook = params.get("url") or None
        return True

    async def _api_getWebhookInfo(self, params: dict[str, Any]) -> Any:
        return {
            "url": self.registered_webhook or "",
            "has_custom_certificate": False,
            "pending_update_count": len(self.pending),
        }

    async def _api_close(self, params: dict[str, Any]) -> Any:
        return True
