"""Running the real `python -m bot serve` process on 127.0.0.1 and a free port, for tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.bot.harness import ROOT, eventually
from tests.servers import free_port

#: A request that keeps a row of the session's server (8192-token window) busy for seconds.
ENDLESS = {
    "model": "long-model",
    "prompt": "Привет",
    "max_tokens": 8000,
    "stream": True,
    "extra_body": {"min_tokens": 8000},
}


class ModelServer:
    """``python -m bot serve`` with the given settings; :meth:`start` returns once it is ready."""

    def __init__(self, model_dir: Path, log: Path, **settings: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.root_url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "API_KEYS"))},
            "MODEL_PATH": str(model_dir),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            **settings,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> ModelServer:
        handle = self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot", "serve", "--port", str(self.port)],
            cwd=self.log.parent,  # a stray .env in the checkout is not read
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=handle,
        )
        deadline = time.monotonic() + timeout
        while self.health() != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("bot serve did not start:\n" + self.log_text()[-3000:])
            time.sleep(0.1)
        return self

    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(f"{self.root_url}/healthz", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def metric(self, name: str) -> float:
        """One value of ``GET /metrics`` (a Prometheus sample without labels)."""
        with urllib.request.urlopen(f"{self.root_url}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise KeyError(name)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


async def fill_queue(client: Any, server: ModelServer) -> list[Any]:
    """Two rows decoding (MAX_BATCH=2) and one request waiting (QUEUE_SIZE=1): the next request
    finds the queue full. Returns the open streams; closing them frees the rows."""
    streams = []
    for _ in range(2):
        streams.append(await client.completions.create(**ENDLESS))
        await anext(aiter(streams[-1]))  # a streamed token: its row is decoding
    streams.append(await client.completions.create(**ENDLESS))
    await eventually(lambda: server.metric("server_queue_depth") == 1, "a full queue")
    return streams


async def release(streams: list[Any], server: ModelServer) -> None:
    """Close the streams (the clients leave) and wait until their rows are gone."""
    for stream in streams:
        await stream.close()
    await eventually(
        lambda: (
            server.metric("server_running_rows") == 0 and server.metric("server_queue_depth") == 0
        ),
        "the rows of the clients that left to be dropped",
    )
