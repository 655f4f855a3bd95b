"""Running a call in a thread that ends when it returns (loading the model, compiling kernels)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_in_own_thread(function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` in a new thread that ends when it returns (for loading the model).

    Why not ``asyncio.to_thread``: its threads live on, and so does the OpenMP thread team of any
    thread that ran a parallel torch operation (loading and converting weights does). With more
    OpenMP threads alive than cores, libgomp stops spin-waiting between parallel regions and puts
    its threads to sleep instead, and every matrix product of the engine's worker pays for the
    wake-ups: measured on the 2-core machine, a batch-8 decoding step took ~30% longer after the
    model was loaded in a thread that stayed alive. A thread that has ended takes its team with it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as error:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    thread = threading.Thread(target=run, name=f"run-{getattr(function, '__name__', 'call')}")
    thread.start()
    try:
        return await future
    finally:
        thread.join()  # already returned: the thread only has to exit
