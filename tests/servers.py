"""Real Redis and PostgreSQL servers for tests: Debian's binaries on 127.0.0.1 and a free port.

Nothing is mocked: the bot talks to the same servers it meets in production. A test that needs
one is skipped, with the reason and the package to install, when the binary is not on this
machine (`.ci/run` installs both).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}: {log.read_text()[-2000:]}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not open port {port} in {timeout} s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


#: the running ``redis_server`` processes by URL, for a test that makes Redis hang (SIGSTOP)
REDIS_PROCESSES: dict[str, subprocess.Popen[bytes]] = {}
REDIS_COMMANDS: dict[str, list[str]] = {}


def restart_redis(url: str, down_s: float = 1.0) -> None:
    """Kill the ``redis_server`` at ``url`` (``kill -9``: every key lost, no persistence) and
    start it again on the same port after ``down_s``."""
    old = REDIS_PROCESSES[url]
    old.kill()
    old.wait()
    time.sleep(down_s)
    process = subprocess.Popen(
        REDIS_COMMANDS[url], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    REDIS_PROCESSES[url] = process
    port = urlsplit(url).port
    _wait_for_port(port, process, Path(REDIS_COMMANDS[url][-1]))


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """``redis-server`` with no persistence; yields its URL. Skips the test without it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="redis-"))
    log = workdir / "redis.log"
    command = [
        *(binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
        *("--appendonly", "no", "--dir", str(workdir), "--logfile", str(log)),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        log.touch()
        _wait_for_port(port, process, log)
        REDIS_PROCESSES[url] = process
        REDIS_COMMANDS[url] = command
        yield url
    finally:
        process = REDIS_PROCESSES.pop(url, process)  # the one running now (restart_redis)
        REDIS_COMMANDS.pop(url, None)
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a test may have left it stopped
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


def _postgres_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class PostgresServer:
    """A throw-away PostgreSQL cluster (trust authentication, no fsync: test data only)."""

    def __init__(self) -> None:
        initdb, postgres = _postgres_bin("initdb"), _postgres_bin("postgres")
        if initdb is None or postgres is None:
            pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="pg-"))
        self.log = self.workdir / "postgres.log"
        data, sockets = self.workdir / "data", self.workdir / "sockets"
        sockets.mkdir()
        self.log.touch()
        # PostgreSQL refuses to run as root; CI and these machines are root.
        self._user = None
        if os.geteuid() == 0:
            self._user = "postgres"
            shutil.chown(self.workdir, self._user)
            for path in (sockets, self.log):
                shutil.chown(path, self._user)
        self._run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        self._command = self._as_user(
            [
                *(postgres, "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1"),
                *("-k", str(sockets), "-c", "fsync=off", "-c", "synchronous_commit=off"),
                *("-c", "full_page_writes=off", "-c", "max_connections=200"),
            ]
        )
        self.start()
        self._names = iter(range(1, 10_000))

    def start(self) -> None:
        """Start the server (again, after :meth:`go_down`: a restart keeps its data)."""
        self.process = subprocess.Popen(
            self._command, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        _wait_for_port(self.port, self.process, self.log)
        deadline = time.monotonic() + 30
        ready = _postgres_bin("pg_isready") or "pg_isready"
        while subprocess.run(  # the port opens a moment before connections are accepted
            [ready, "-q", "-h", "127.0.0.1", "-p", str(self.port)], check=False
        ).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not get ready: see {self.log}")
            time.sleep(0.1)

    def go_down(self) -> None:
        """Shut the server down (fast shutdown: connections terminated, as a restart does)."""
        pg_ctl = _postgres_bin("pg_ctl") or "pg_ctl"
        self._run([pg_ctl, "-D", str(self.workdir / "data"), "stop", "-m", "fast", "-w"])
        self.process.wait(30)

    def _as_user(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", self._user, "--", *command] if self._user else command

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(self._as_user(command), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stdout[-1000:]}{done.stderr[-1000:]}")

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy (asyncpg) URL."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        psql = _postgres_bin("psql") or "psql"
        deadline = time.monotonic() + 30
        while True:  # the port opens a moment before the server accepts connections
            done = subprocess.run(
                [
                    *(psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"),
                    *("-d", "postgres", "-c", f"CREATE DATABASE {name}"),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode == 0:
                return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot create a database: {done.stderr[-1000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        _stop(self.process)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def silenced_connections(database: str) -> AsyncIterator[list[int]]:
    """Every other client's connection to ``database`` (an asyncpg DSN) stops answering inside
    the block, as behind a failover or a network partition that drops packets, while new
    connections work: their server processes are stopped (SIGSTOP), once all of them are idle
    (no transaction under way), and resumed at the end. Yields their process ids."""
    import asyncpg

    connection = await asyncpg.connect(database)
    try:
        deadline = time.monotonic() + 30
        while True:
            rows = await connection.fetch(
                "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
            if rows and all(row["state"] == "idle" for row in rows):
                break
            assert time.monotonic() < deadline, f"the connections stay busy: {rows}"
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
    pids = [row["pid"] for row in rows]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


class TcpRelay:
    """A TCP relay on 127.0.0.1 in front of a server: what a network between the bot and its
    database or Redis does to the bytes, made to order by a subclass (:meth:`passes`, the
    delay). Each direction's bytes keep their order; a delay holds each chunk from the moment
    it arrived, so it adds latency without limiting throughput, as a long network path does."""

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.port = 0
        self.delay_s = 0.0  # added to every chunk, both ways, while set
        self.delayed = 0  # chunks held back so far: evidence that the delay was met
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, server_url: str) -> str:
        """``server_url`` (a server on 127.0.0.1) through this relay."""
        return server_url.replace(f":{self.server_port}/", f":{self.port}/")

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def passes(self, data: bytes, to_server: bool, connection: dict[str, bool]) -> bool:
        """Whether ``data`` goes on (``connection``: this connection's own state)."""
        return True

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        to_server: bool,
        connection: dict[str, bool],
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                sink.write(data)
                await sink.drain()

        sender = asyncio.create_task(send())
        try:
            while data := await source.read(65536):
                if self.passes(data, to_server, connection):
                    self.delayed += self.delay_s > 0
                    queue.put_nowait((loop.time() + self.delay_s, data))
                if sender.done():
                    return
            while not queue.empty() and not sender.done():  # what is on its way still arrives
                await asyncio.sleep(0.01)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.server_port
        )
        connection: dict[str, bool] = {}
        directions = [
            asyncio.create_task(self._pump(reader, upstream_writer, True, connection)),
            asyncio.create_task(self._pump(upstream_reader, writer, False, connection)),
        ]
        try:  # either side closing closes the other (a client waits for the server's close)
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for direction in directions:
                direction.cancel()
            await asyncio.gather(*directions, return_exceptions=True)
            for stream in (writer, upstream_writer):
                stream.close()
            self._tasks.discard(task)


class CommitReplyLoss(TcpRelay):
    """A relay in front of a PostgreSQL server that can lose the server's reply to one
    ``COMMIT``, or to a statement that commits by itself: the write is committed, and its
    client never hears so (the connection goes silent after it), as when a network fails at
    that moment. The client's only evidence is its own timeout: whether the write happened is
    for it to find out."""

    def __init__(self, server_port: int) -> None:
        super().__init__(server_port)
        self.lost = asyncio.Event()  # set when a commit's reply has been dropped
        self._armed: bytes | None = None

    def lose_next_commit_reply(self, statement: bytes = b"COMMIT") -> None:
        """Drop the replies from the next message to the server that holds ``statement``."""
        self._armed = statement

    def passes(self, data: bytes, to_server: bool, connection: dict[str, bool]) -> bool:
        if to_server and self._armed and self._armed in data:
            self._armed = None
            connection["silent"] = True  # this connection's replies are dropped from now on
            self.lost.set()
        return to_server or not connection.get("silent", False)
