"""Start the real bot process without paying for its imports each time.

`python -m bot` spends about 16 s of CPU (measured on the 2-core Zen 3) importing aiogram's
types, torch and transformers before it does anything; the suite starts the bot about seventy
times. This server imports ``bot.app`` once, then forks a fresh process per bot: the child sets
the test's environment, working directory and log file, and runs the very ``main()`` that
``python -m bot`` runs. Everything after the imports (settings, the database, the model, the
event loop, signals) is the child's own, as in a process started from scratch.

Only settings read at run time may differ between bots started this way: an environment
variable a library reads while it is imported (OpenMP's, the Hugging Face hub's) is the test
session's. The tests that vary those, and the operator's acceptance test, exec ``python -m
bot`` itself (``BotProcess(..., fork=False)``).

Protocol (one Unix socket connection per bot): the test sends one JSON line ``{"env", "cwd",
"log", "argv"}``; the server answers the bot's pid on one line and, when the bot exits, its
exit code on another (negative: the signal that ended it, as ``asyncio`` reports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_bot(request: dict) -> int:
    """In the forked child: become the bot the request describes, run it, return its code."""
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(devnull)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [str(ROOT / "bot" / "__main__.py"), *request["argv"]]
    from bot.__main__ import main

    try:
        return main(list(request["argv"]))
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _supervise(connection: socket.socket, request: dict) -> None:
    """In the first child: fork the bot, report its pid, wait for it, report its exit."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        connection.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)
        os._exit(_run_bot(request))
    connection.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())


def serve(path: str) -> None:
    # What `python -m bot` imports before it runs: aiogram, the engine (torch, transformers),
    # the database layer, and the model class the tests' models use.
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401

    import bot.__main__
    import bot.app
    import bot.engine.factory  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        connection, _ = server.accept()
        with connection.makefile("r", encoding="utf-8") as lines:
            request = json.loads(lines.readline())
        if os.fork() == 0:
            server.close()
            try:
                _supervise(connection, request)
            finally:
                os._exit(0)
        connection.close()


class ForkServer:
    """The server for this test process, started on first use and stopped at exit."""

    _running: ForkServer | None = None

    def __init__(self) -> None:
        self.path = tempfile.mktemp(prefix="bot-forkserver-", suffix=".sock")
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "tests.bot.forkserver", self.path],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the bot fork server did not start")

    @classmethod
    def get(cls) -> ForkServer:
        if cls._running is None or cls._running.process.poll() is not None:
            cls._running = cls()
            import atexit

            atexit.register(cls._running.stop)
        return cls._running

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        Path(self.path).unlink(missing_ok=True)


class ForkedBot:
    """A bot forked by the server, with what the tests use of ``asyncio``'s process object:
    ``pid``, ``returncode`` (None while it runs), ``send_signal``, ``kill``, ``wait``."""

    def __init__(self) -> None:
        self.pid = 0
        self.returncode: int | None = None
        self._exited: asyncio.Task[int] | None = None

    @classmethod
    async def start(cls, env: dict[str, str], cwd: Path, log: Path, argv: list[str]) -> ForkedBot:
        server = await asyncio.to_thread(ForkServer.get)
        reader, writer = await asyncio.open_unix_connection(server.path)
        request = {"env": env, "cwd": str(cwd), "log": str(log), "argv": argv}
        writer.write((json.dumps(request) + "\n").encode())
        await writer.drain()
        bot = cls()
        bot.pid = int(await reader.readline())

        async def exited() -> int:
            line = await reader.readline()
            writer.close()
            bot.returncode = int(line) if line.strip() else -signal.SIGKILL
            return bot.returncode

        bot._exited = asyncio.create_task(exited())
        return bot

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    async def wait(self) -> int:
        assert self._exited is not None
        return await asyncio.shield(self._exited)


if __name__ == "__main__":
    serve(sys.argv[1])
