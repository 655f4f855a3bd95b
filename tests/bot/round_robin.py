"""A small round-robin HTTP proxy on 127.0.0.1: the load balancer in front of bot replicas.

Each request goes to the next upstream in turn; an upstream that refuses the connection (a
replica that is down) is skipped for the next one, as a load balancer's passive health check
does. A request cut off mid-way (a replica killed while handling it) is answered 502, and the
sender (Telegram) delivers it again.
"""

from __future__ import annotations

import itertools

import aiohttp
from aiohttp import web

#: Hop-by-hop and length headers the proxy sets itself.
SKIPPED_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


class RoundRobinProxy:
    def __init__(self, upstreams: list[str]) -> None:
        self.upstreams = upstreams
        self._next = itertools.cycle(range(len(upstreams)))
        self.forwarded = [0] * len(upstreams)  # requests each upstream answered
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> str:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._http is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in SKIPPED_HEADERS}
        for _ in self.upstreams:
            index = next(self._next)
            try:
                async with self._http.request(
                    request.method,
                    self.upstreams[index] + request.path_qs,
                    data=body,
                    headers=headers,
                ) as response:
                    payload = await response.read()
                    self.forwarded[index] += 1
                    return web.Response(
                        status=response.status,
                        body=payload,
                        content_type=response.content_type,
                    )
            except aiohttp.ClientConnectorError:
                continue  # down: try the next one
            except (aiohttp.ClientError, TimeoutError):
                return web.Response(status=502, text="upstream failed mid-request")
        return web.Response(status=502, text="no upstream is up")
