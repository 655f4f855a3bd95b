"""The Mini App's page in a real headless Chromium, against the real bot process (polling, the
page on WEBAPP_PORT), its SQLite database and the fake Bot API.

The page is opened as Telegram's clients open it: launch data signed with the bot's token in
the URL fragment (``bot.webapp.auth.sign_init_data``, the same signing as the operator's link).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from bot.webapp.auth import launch_link, sign_init_data
from tests.bot.browser import Browser, chromium_or_skip
from tests.bot.harness import ALICE, BOB, TOKEN, BotProcess, bot_replies, eventually
from tests.servers import free_port

MALLORY = 1003  # on the blocklist
DARK = {"bg_color": "#17212b", "text_color": "#f5f5f5", "secondary_bg_color": "#232e3c"}
#: Where the page's screenshot goes (README's picture): WEBAPP_SCREENSHOT=path, else tmp.
SCREENSHOT_ENV = "WEBAPP_SCREENSHOT"


@pytest.fixture
def browser():
    chromium_or_skip()
    opened = Browser()
    yield opened
    opened.quit()


@pytest.fixture
async def page_bot(fake, bot_env, long_model_dir, tmp_path):
    """Start the bot with its page; yields (the page's URL, the process). Polling mode serves
    the page on WEBAPP_PORT; ``webhook=True``: beside the webhook on LISTEN_PORT, Telegram
    delivering updates there."""
    started: list[BotProcess] = []

    async def start(webhook: bool = False, **extra: str) -> tuple[str, BotProcess]:
        port = free_port()
        env = {
            **bot_env,
            "MODEL_PATH": str(long_model_dir),
            "WEBAPP_URL": "https://bot.example.test/app/",
            "BLOCKED_USER_IDS": str(MALLORY),
            **extra,
        }
        if webhook:
            env |= {
                "WEBHOOK_URL": "https://bot.example.test/webhook",
                "WEBHOOK_SECRET": "page-test-secret",
                "LISTEN_PORT": str(port),
            }
        else:
            env["WEBAPP_PORT"] = str(port)
        bot = BotProcess(env, tmp_path / "bot.log")
        started.append(bot)
        await bot.start(fake, wait=not webhook)
        if webhook:
            await fake.wait_for(lambda: fake.count("setWebhook") == 1, timeout=90)
            fake.deliver_to(f"http://127.0.0.1:{port}/webhook", "page-test-secret")
        return f"http://127.0.0.1:{port}/app/", bot

    yield start
    for bot in started:
        bot.kill()


def signed(user_id: int, name: str = "Алиса", token: str = TOKEN, age_s: float = 0) -> str:
    return sign_init_data(token, user_id, name, auth_date=int(time.time() - age_s))


def auth(init_data: str) -> dict[str, str]:
    return {"Authorization": f"tma {init_data}"}


def rows(db: Path, query: str, *args: object) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(query, args).fetchall()


def facts_of(db: Path, telegram_id: int) -> list[tuple]:
    """(id, value) of each fact kept about ``telegram_id``."""
    return rows(
        db,
        "SELECT f.id, f.value FROM user_facts f JOIN users u ON u.id = f.user_id "
        "WHERE u.telegram_id = ? ORDER BY f.id",
        telegram_id,
    )


def messages_of(db: Path, telegram_id: int) -> list[tuple]:
    return rows(
        db,
        "SELECT m.id, m.role, m.text FROM messages m JOIN users u ON u.id = m.user_id "
        "WHERE u.telegram_id = ? ORDER BY m.id",
        telegram_id,
    )


def prompts(log: Path) -> list[str]:
    return [ln for ln in log.read_text(errors="replace").splitlines() if "prompt:" in ln]


async def metric(base: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(base.replace("/app/", "/metrics")) as r:
        found = re.search(rf"^{name} (\S+)$", await r.text(), re.MULTILINE)
    assert found, name
    return float(found.group(1))


async def test_the_page_as_a_user_sees_it(fake, page_bot, browser, tmp_path):
    db, log = tmp_path / "bot.db", tmp_path / "bot.log"
    url, _ = await page_bot(REPLY_TOKENS="400")
    button = next(c for c in fake.calls if c.method == "setChatMenuButton").params["menu_button"]
    assert button["type"] == "web_app" and button["web_app"]["url"].endswith("/app/")

    fake.send_text(ALICE, "Меня зовут Алиса, я из Казани")
    fake.send_text(BOB, "Меня зовут Боб, у меня есть собака")
    await eventually(lambda: len(bot_replies(db, ALICE)) == 1, "Alice's reply in Telegram")
    await eventually(lambda: len(bot_replies(db, BOB)) == 1, "Bob's reply in Telegram")

    # Alice's conversation, and nobody else's, in the dark theme, on a phone's width
    await asyncio.to_thread(browser.open, url, signed(ALICE), DARK)
    shown = await asyncio.to_thread(browser.wait, lambda: browser.bubbles(), "the conversation")
    assert [text for _, text in shown] == [
        "Меня зовут Алиса, я из Казани",
        bot_replies(db, ALICE)[0],
    ]
    assert [cls for cls, _ in shown] == ["user", "bot"]
    assert browser.js("return getComputedStyle(document.body).backgroundColor") == "rgb(23, 33, 43)"
    assert browser.js("return document.documentElement.scrollWidth") <= 390
    assert not browser.visible("reopen")

    # A typed message: the reply grows while it is generated, then is stored as shown. The tiny
    # random model ends about one reply in twenty at once: such a reply shows whole, so Alice
    # asks again until one grows on screen.
    for attempt in range(5):
        asked = f"Расскажи что-нибудь интересное {attempt}"
        await asyncio.to_thread(browser.type_and_send, asked)
        seen = await asyncio.to_thread(browser.watch_reply)
        if len(seen) >= 3:
            break
    assert len(seen) >= 3, seen
    assert len(seen[-1]) > len(seen[0])
    await eventually(lambda: bot_replies(db, ALICE)[-1] == seen[-1], "the reply stored as shown")
    user_rows = rows(db, "SELECT telegram_message_id FROM messages WHERE text = ?", asked)
    assert user_rows == [(None,)]  # a page message: never answered again in Telegram

    # after a reload it is part of the conversation, and of the Telegram chat's next prompt
    await asyncio.to_thread(browser.driver.refresh)
    await asyncio.to_thread(
        browser.wait,
        lambda: browser.bubbles()[-2:] == [("user", asked), ("bot", seen[-1])],
        "the reload",
    )
    fake.send_text(ALICE, "А что я спрашивала?")
    await eventually(lambda: "А что я спрашивала?" in (prompts(log) or [""])[-1], "the prompt")
    assert asked in prompts(log)[-1] and seen[-1] in prompts(log)[-1]
    await eventually(lambda: len(fake.sent_to(ALICE)) >= 2, "the Telegram reply")

    # markup from the user and from the model is text: no element, no alert
    attack = "<img src=x onerror=alert(1)>"
    await asyncio.to_thread(browser.type_and_send, attack)
    await asyncio.to_thread(browser.watch_reply)
    [(alice_row,)] = rows(db, "SELECT id FROM users WHERE telegram_id = ?", ALICE)
    markup = "<b>жирный</b><script>alert(2)</script><img src=y onerror=alert(3)>"
    with sqlite3.connect(db) as connection:  # a reply holding markup, as a model could write
        connection.execute(
            "INSERT INTO messages (user_id, role, text, created_at) VALUES (?, 'bot', ?, "
            "CURRENT_TIMESTAMP)",
            (alice_row, markup),
        )
    await asyncio.to_thread(browser.driver.refresh)
    await asyncio.to_thread(
        browser.wait, lambda: browser.bubbles()[-1:] == [("bot", markup)], "markup"
    )
    texts = [text for _, text in browser.bubbles()]
    assert attack in texts
    assert (
        browser.js(
            "return document.querySelectorAll("
            "'#messages img, #messages script, #messages b').length"
        )
        == 0
    )
    assert browser.alert_text() is None
    assert not browser.visible("regenerate")  # the newest reply is not one asked on the page

    # memory: Alice's facts, one forgotten with its button; the temperature set
    await asyncio.to_thread(browser.js, "document.getElementById('tab-memory').click()")
    facts = await asyncio.to_thread(
        browser.wait,
        browser.facts,
        "the facts",
    )
    assert any("Алиса" in f for f in facts) and any("Казань" in f for f in facts), facts
    assert not any("Боб" in f for f in facts)
    await asyncio.to_thread(
        browser.js,
        "[...document.querySelectorAll('#facts li')].find(li => li.textContent.includes('Казань'))"
        ".querySelector('button').click()",
    )
    await asyncio.to_thread(
        browser.wait, lambda: not any("Казань" in f for f in browser.facts()), "the fact gone"
    )
    stored_facts = [value for _, value in facts_of(db, ALICE)]
    assert "Казань" not in stored_facts and "Алиса" in stored_facts
    await asyncio.to_thread(
        browser.js,
        "document.getElementById('temperature').value = '0.5';"
        "document.querySelector('#settings-form button').click()",
    )
    await eventually(
        lambda: rows(db, "SELECT temperature FROM users WHERE telegram_id = ?", ALICE) == [(0.5,)],
        "the temperature kept",
    )
    assert rows(db, "SELECT temperature FROM users WHERE telegram_id = ?", BOB) == [(None,)]

    # the README's picture: the conversation in the light theme, on a phone
    await asyncio.to_thread(browser.open, url + "?shot", signed(ALICE))
    await asyncio.to_thread(browser.wait, lambda: len(browser.bubbles()) >= 4, "the conversation")
    shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "webapp.png")
    assert browser.driver.save_screenshot(str(shot))


async def test_stop_cancels_the_generation_on_the_server(fake, page_bot, browser, tmp_path):
    db = tmp_path / "bot.db"
    url, _ = await page_bot(REPLY_TOKENS="1024")
    await asyncio.to_thread(browser.open, url, signed(ALICE))
    await asyncio.to_thread(browser.wait, lambda: browser.visible("send"), "the page")
    for attempt in range(5):  # a reply the random model ends at once cannot be stopped
        await asyncio.to_thread(browser.type_and_send, f"Напиши длинный рассказ {attempt}")
        growing = await asyncio.to_thread(
            browser.wait,
            lambda: browser.js(
                "const li = document.querySelector('#messages li:last-child');"
                "return li.textContent.length > 0 ? [li.classList.contains('streaming')] : null"
            ),
            "the first words",
        )
        # Still generating on the server too: the reply may have ended between the page's
        # last words and this read (the random model stops at any token), then try again.
        if growing[0] and await metric(url, "bot_webapp_generations") == 1:
            await asyncio.to_thread(browser.js, "document.getElementById('stop').click()")
            break
        await asyncio.to_thread(browser.wait, lambda: browser.visible("send"), "the short reply")
    else:
        pytest.fail("no reply lasted long enough to stop")
    await asyncio.to_thread(browser.wait, lambda: browser.visible("send"), "the page after Stop")
    stopped_at = browser.bubbles()[-1][1]

    async def generations() -> tuple[float, float]:
        return (
            await metric(url, "bot_webapp_generations"),
            await metric(url, "bot_engine_active_rows"),
        )

    deadline = time.monotonic() + 30
    while await generations() != (0.0, 0.0):
        assert time.monotonic() < deadline, await generations()
        await asyncio.sleep(0.1)
    # what the user saw is kept as the reply, cut where it was stopped (after the replies of
    # the attempts that ended at once)
    replies = attempt + 1
    await eventually(lambda: len(bot_replies(db, ALICE)) == replies, "the stopped reply stored")
    cut = bot_replies(db, ALICE)[-1]
    assert cut.startswith(stopped_at[: len(stopped_at) // 2])
    assert len(cut) < 1024 * 4  # far from the tokens asked for
    await asyncio.to_thread(browser.driver.refresh)
    await asyncio.to_thread(
        browser.wait, lambda: len(browser.bubbles()) == 2 * replies, "the reload"
    )
    assert browser.visible("regenerate")
    assert browser.bubbles()[-1] == ("bot", cut)

    # Regenerate: the page's last reply is replaced, in the database too (one reply, new text)
    await asyncio.to_thread(browser.js, "document.getElementById('regenerate').click()")
    regenerated = await asyncio.to_thread(browser.watch_reply)
    await eventually(
        lambda: len(bot_replies(db, ALICE)) == replies and bot_replies(db, ALICE)[-1] != cut,
        "the regenerated reply stored in place of the first",
    )
    assert [role for _, role, _ in messages_of(db, ALICE)] == ["user", "bot"] * replies
    assert bot_replies(db, ALICE)[-1] == regenerated[-1]


async def test_launch_data_decides_who_is_asking_on_every_route(fake, page_bot, browser, tmp_path):
    db = tmp_path / "bot.db"
    url, _ = await page_bot(
        webhook=True, REPLY_TOKENS="16", RATE_LIMIT_MESSAGES="3", RATE_LIMIT_WINDOW_S="600"
    )
    api = url + "api/"
    fake.send_text(ALICE, "Меня зовут Алиса")
    await eventually(lambda: len(bot_replies(db, ALICE)) == 1, "Alice's reply")
    [(alice_fact, _)] = alice_facts = facts_of(db, ALICE)
    alice_before = messages_of(db, ALICE)

    bad = {
        "none": None,
        "tampered": signed(ALICE).replace("%22id%22%3A%201001", "%22id%22%3A%201002"),
        "foreign bot": signed(ALICE, token="654321:another-bots-token"),
        "expired": signed(ALICE, age_s=2 * 86400),
    }
    assert bad["tampered"] != signed(ALICE)
    routes = [
        ("GET", "me", None),
        ("GET", "messages", None),
        ("POST", "messages", {"text": "привет"}),
        ("POST", "regenerate", {}),
        ("GET", "memory", None),
        ("DELETE", f"memory/facts/{alice_fact}", None),
        ("PUT", "settings", {"temperature": 1.5}),
    ]
    async with aiohttp.ClientSession() as http:
        for name, data in bad.items():
            headers = auth(data) if data else {}
            for method, path, body in routes:
                async with http.request(method, api + path, json=body, headers=headers) as r:
                    assert r.status == 401, (name, method, path)
                    assert (await r.json())["error"] == "reopen"
        async with http.get(api + "me", headers=auth(signed(MALLORY, "Мэлори"))) as r:
            assert r.status == 403  # the blocklist applies on the page too

        # Bob's launch data on every route reaches Bob's data only
        bob = auth(signed(BOB, "Боб"))
        async with http.get(api + "messages", headers=bob) as r:
            assert (await r.json())["messages"] == []
        async with http.get(api + "memory", headers=bob) as r:
            assert (await r.json())["facts"] == []
        async with http.delete(api + f"memory/facts/{alice_fact}", headers=bob) as r:
            assert r.status == 404
        async with http.put(
            api + "settings", json={"temperature": 1.5, "memory": False}, headers=bob
        ) as r:
            assert r.status == 200 and (await r.json())["temperature"] == 1.5
        async with http.post(api + "regenerate", headers=bob) as r:
            assert json.loads((await r.text()).splitlines()[-1])["error"] == "not_regenerable"
        async with http.post(api + "messages", json={"text": "Я Боб"}, headers=bob) as r:
            assert r.status == 200 and json.loads((await r.text()).splitlines()[-1])["done"]
        assert rows(
            db, "SELECT temperature, memory_enabled FROM users WHERE telegram_id = ?", ALICE
        ) == [(None, 1)]
        assert facts_of(db, ALICE) == alice_facts
        assert messages_of(db, ALICE) == alice_before

        # the rate limit (3) counts the page's generations: Bob's fourth is refused
        for expected in (200, 429):
            async with http.post(api + "messages", json={"text": "ещё"}, headers=bob) as r:
                assert r.status == expected
        # bodies are capped; a bad setting changes nothing
        async with http.post(
            api + "messages",
            data=b"x" * 100_000,
            headers={**bob, "Content-Type": "application/json"},
        ) as r:
            assert r.status == 413

        async def chunks(*parts: bytes):  # type: ignore[no-untyped-def]
            for part in parts:  # a body without a length, in pieces
                yield part
                await asyncio.sleep(0.05)

        async with http.put(
            api + "settings", data=chunks(b'{"tempera', b'ture": 1', b".5}"), headers=bob
        ) as r:
            assert r.status == 200, await r.text()
        async with http.put(
            api + "settings", data=chunks(b'{"memory": "', b"y" * 20_000, b'"}'), headers=bob
        ) as r:
            assert r.status == 413
        async with http.put(api + "settings", json={"temperature": 9}, headers=bob) as r:
            assert r.status == 400 and "0.1" in (await r.json())["text"]
        assert rows(db, "SELECT temperature FROM users WHERE telegram_id = ?", BOB) == [(1.5,)]

        # headers: framed by Telegram's web clients only, no CORS, no X-Frame-Options
        async with http.get(url) as r:
            policy = r.headers["Content-Security-Policy"]
            assert "frame-ancestors" in policy and "https://web.telegram.org" in policy
            assert "X-Frame-Options" not in r.headers
        async with http.options(
            api + "messages",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        ) as r:
            assert not any(h.lower().startswith("access-control-") for h in r.headers)
        async with http.get(api + "me", headers={**bob, "Origin": "https://evil.example"}) as r:
            assert r.status == 200
            assert not any(h.lower().startswith("access-control-") for h in r.headers)

    # the page tells the user to reopen it, for each kind of bad launch data
    for name in ("tampered", "foreign bot", "expired"):
        await asyncio.to_thread(browser.open, url, bad[name])
        await asyncio.to_thread(browser.wait, lambda: browser.visible("reopen"), f"reopen ({name})")
        assert "Telegram" in browser.js("return document.getElementById('reopen-text').textContent")
    await asyncio.to_thread(browser.driver.get, url)  # no launch data at all
    await asyncio.to_thread(browser.wait, lambda: browser.visible("reopen"), "reopen (none)")


def test_the_operators_link_opens_the_page_as_that_user(bot_env, tmp_path):
    """`python -m bot webapp-link` prints the page's address with signed launch data."""
    from bot.webapp.auth import authenticate
    from tests.bot.harness import run_python

    env = {**bot_env, "WEBAPP_PORT": "8123", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = run_python("-m", "bot", "webapp-link", "--user-id", str(ALICE), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip()
    assert link.startswith("http://127.0.0.1:8123/app/#tgWebAppData=")
    from urllib.parse import parse_qs

    init_data = parse_qs(link.partition("#")[2])["tgWebAppData"][0]
    assert authenticate(TOKEN, f"tma {init_data}", 60).telegram_id == ALICE
    assert link == launch_link("http://127.0.0.1:8123/app/", init_data)
    assert "valid for 24 h" in done.stderr
    env.pop("WEBAPP_PORT")
    refused = run_python("-m", "bot", "webapp-link", "--user-id", "5", cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "WEBAPP_URL" in refused.stderr
