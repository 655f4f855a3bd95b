"""A real headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by Selenium,
for the Mini App's page. Nothing is downloaded: the driver and the browser are the installed
ones, and the browser resolves no name but loopback addresses (Telegram's script, which the
page loads from telegram.org, fails at once, as it does on an offline network).

Selenium's calls block, so tests run them in a thread (``asyncio.to_thread``) while the bot's
fake Telegram keeps answering on the event loop.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest

#: A phone's viewport, as the issue asks the layout to fit (CSS pixels).
PHONE = (390, 844)


def chromium_or_skip() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        )
    return browser, driver


class Browser:
    """One headless Chromium with a phone-sized viewport."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        browser, driver = chromium_or_skip()
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for argument in (
            "--headless=new",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # loopback only: every other name fails to resolve, so nothing leaves the machine
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        ):
            options.add_argument(argument)
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=driver))
        self.driver.set_page_load_timeout(60)
        width, height = PHONE
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True},
        )

    def quit(self) -> None:
        self.driver.quit()

    def open(self, page_url: str, init_data: str, theme: dict[str, str] | None = None) -> None:
        """The page as Telegram's clients open it: the launch data in the URL fragment."""
        fragment = f"tgWebAppData={quote(init_data, safe='')}"
        if theme is not None:
            fragment += f"&tgWebAppThemeParams={quote(json.dumps(theme), safe='')}"
        self.driver.get(f"{page_url}#{fragment}")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
        """Poll until ``predicate()`` is truthy (the state asserted next); its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)

    def bubbles(self) -> list[tuple[str, str]]:
        """The conversation as shown: (class, text) of each message, oldest first."""
        return [
            (item["cls"], item["text"])
            for item in self.js(
                "return [...document.querySelectorAll('#messages li')]"
                ".map(li => ({cls: li.className.replace(' streaming', ''), text: li.textContent}))"
            )
        ]

    def facts(self) -> list[str]:
        """The memory tab's facts as shown ("Имя: Алиса")."""
        return list(
            self.js(
                "return [...document.querySelectorAll('#facts li span')].map(s => s.textContent)"
            )
        )

    def visible(self, element_id: str) -> bool:
        return bool(self.js("return !document.getElementById(arguments[0]).hidden", element_id))

    def type_and_send(self, text: str) -> None:
        self.js(
            "const box = document.getElementById('text'); box.value = arguments[0];"
            "document.getElementById('send').click();",
            text,
        )

    def watch_reply(self, timeout: float = 120.0) -> list[str]:
        """The newest bubble's texts while its reply streams, until it is done."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.js(
                "const li = document.querySelector('#messages li:last-child');"
                "return li ? [li.textContent, li.classList.contains('streaming')] : ['', true]"
            )
            if state[0] and (not seen or seen[-1] != state[0]):
                seen.append(state[0])
            if not state[1] and not self.visible("stop"):
                return seen
            time.sleep(0.02)
        raise AssertionError(f"the reply did not finish in {timeout} s; seen {seen[-1:]}")

    def alert_text(self) -> str | None:
        from selenium.common.exceptions import NoAlertPresentException

        try:
            return str(self.driver.switch_to.alert.text)
        except NoAlertPresentException:
            return None
