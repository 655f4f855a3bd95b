"""Who is asking: Telegram's signed Mini App launch data (``initData``), and nothing else.

Telegram signs the launch data it hands a Mini App with a key derived from the bot's token
(HMAC-SHA256 of the token under ``"WebAppData"``), so only Telegram and the bot itself can make
it. Every API request carries it (``Authorization: tma <initData>``) and is checked here with
aiogram's :func:`safe_parse_webapp_init_data`, plus a maximum age of ``auth_date``: launch data
copied out of a page stays valid for as long as the bot accepts it, so it must expire. There
are no cookies and no sessions: a request is the user in its launch data, or nobody.

:func:`sign_init_data` makes launch data the way Telegram does; the operator's link command
(``python -m bot webapp-link``) and the tests use it. There is no switch that skips the check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from aiogram.utils.web_app import safe_parse_webapp_init_data

#: The Authorization scheme Telegram's Mini App documentation uses for launch data.
SCHEME = "tma"


class AuthError(Exception):
    """Launch data that does not name a user: missing, badly signed, or too old."""


@dataclass(frozen=True)
class PageUser:
    """The Telegram user a page request comes from (only ever read from checked data)."""

    telegram_id: int
    name: str


def sign_init_data(token: str, user_id: int, first_name: str, auth_date: int | None = None) -> str:
    """Launch data for ``user_id`` signed with the bot's token, as Telegram's clients pass it:
    a query string with ``auth_date``, ``user`` (JSON) and ``hash``."""
    fields = {
        "auth_date": str(int(time.time()) if auth_date is None else auth_date),
        "query_id": f"link-{user_id}",
        "user": json.dumps({"id": user_id, "first_name": first_name}, ensure_ascii=False),
    }
    check = "\n".join(f"{k}={v}" for k, v in sorted(fields.items()))
    secret = hmac.new(b"WebAppData", token.encode(), hashlib.sha256).digest()
    fields["hash"] = hmac.new(secret, check.encode(), hashlib.sha256).hexdigest()
    return urlencode(fields, quote_via=quote)


def launch_link(page_url: str, init_data: str) -> str:
    """The page's address with the launch data in its fragment, where Telegram's clients put
    it (``#tgWebAppData=<url-encoded initData>``): the fragment never reaches a server log."""
    return f"{page_url}#tgWebAppData={quote(init_data, safe='')}"


def authenticate(
    token: str, header: str | None, max_age_s: float, now: float | None = None
) -> PageUser:
    """The user named by an ``Authorization: tma <initData>`` header; :class:`AuthError` for
    anything else (no header, another scheme, a signature that is not this bot's, launch data
    older than ``max_age_s`` or dated in the future, no user in it)."""
    scheme, _, init_data = (header or "").partition(" ")
    if scheme.lower() != SCHEME or not init_data.strip():
        raise AuthError("no Mini App launch data")
    try:
        data = safe_parse_webapp_init_data(token, init_data.strip())
    except ValueError:
        raise AuthError("launch data not signed for this bot") from None
    age = (time.time() if now is None else now) - data.auth_date.timestamp()
    if age > max_age_s or age < -60:  # a minute of clock skew
        raise AuthError("launch data expired")
    if data.user is None:
        raise AuthError("launch data without a user")
    name = " ".join(p for p in (data.user.first_name, data.user.last_name) if p)
    return PageUser(data.user.id, name)
