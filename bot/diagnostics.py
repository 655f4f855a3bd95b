"""Where every asyncio task of the bot is waiting, on demand: ``kill -USR1 <pid>`` logs it.

Why: a reply that never comes while nothing is logged (an await that never ends: a database
lock held elsewhere, a peer that never answers) leaves nothing to read afterwards, and the
process looks healthy (its other users are answered, a replica keeps renewing the user's lease).
The chain of awaits of each task says exactly where it waits. It found the cause of a rare
failure of the replica test, a user's lease held for minutes with nothing logged: the lease's
renewal task had outlived the work under it (``bot.replicas`` says why).

``asyncio.Task.print_stack`` shows only a suspended task's outermost coroutine, so the chain is
followed here through each coroutine's ``cr_await`` (and a generator's ``gi_yieldfrom``, an
async generator's ``ag_await``); what the innermost one waits for is the task's
``_fut_waiter`` (asyncio's own attribute, read only here and only if present): another task is
named, so its own entry continues the story.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

logger = logging.getLogger(__name__)

#: Past this many tasks the dump says how many more there were (a bot with thousands of users
#: waiting is itself the answer).
MAX_TASKS = 200
#: A chain deeper than this is cut (a recursion would otherwise fill the log).
MAX_DEPTH = 64


def await_chain(coroutine: Any) -> list[str]:
    """``file:line in function`` for each coroutine from ``coroutine`` down to the innermost
    one, the one that waits."""
    lines: list[str] = []
    current = coroutine
    for _ in range(MAX_DEPTH):
        frame = (
            getattr(current, "cr_frame", None)
            or getattr(current, "gi_frame", None)
            or getattr(current, "ag_frame", None)
        )
        if frame is None:
            break
        code = frame.f_code
        lines.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        current = (
            getattr(current, "cr_await", None)
            or getattr(current, "gi_yieldfrom", None)
            or getattr(current, "ag_await", None)
        )
    return lines


def _waited_for(task: asyncio.Task[Any]) -> str:
    waited = getattr(task, "_fut_waiter", None)
    if waited is None:
        return ""
    if isinstance(waited, asyncio.Task):
        return f"waiting for task {waited.get_name()}"
    return f"waiting for {waited!r}"[:300]


def describe_tasks(tasks: set[asyncio.Task[Any]]) -> str:
    """Every task in ``tasks``: its name, then its chain of awaits (:func:`await_chain`)."""
    ordered = sorted(tasks, key=lambda task: task.get_name())
    parts = [f"{len(ordered)} task(s)"]
    for task in ordered[:MAX_TASKS]:
        chain = await_chain(task.get_coro())
        waited = _waited_for(task)
        if waited:
            chain.append(waited)
        parts.append(f"task {task.get_name()}:" + "".join(f"\n    {line}" for line in chain))
    if len(ordered) > MAX_TASKS:
        parts.append(f"... and {len(ordered) - MAX_TASKS} more")
    return "\n".join(parts)


def log_tasks() -> None:
    """Log where each task of the running loop waits (one WARNING record)."""
    logger.warning("where each task waits (SIGUSR1): %s", describe_tasks(asyncio.all_tasks()))


def install_task_dump() -> None:
    """``kill -USR1 <pid>`` logs :func:`log_tasks` (on the running loop; not on Windows)."""
    if hasattr(signal, "SIGUSR1"):
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, log_tasks)
