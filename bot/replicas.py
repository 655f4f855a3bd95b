"""Several bot replicas behind one webhook: what they agree on through Redis (``REDIS_URL``).

The rule that keeps one user's conversation in order whichever replica gets which update:

- **Receiving is storing.** In webhook mode with replicas, the handler stores the message before
  the webhook request is answered (``handle_in_background=False``). Telegram sends a chat's next
  update only after the previous one was acknowledged, so the database ids of one user's
  messages follow the order in which they were sent, even when consecutive updates reach
  different replicas. A re-delivered update hits the unique Telegram message id and is dropped,
  on whichever replica it lands.
- **Answering is draining, under a lease.** After storing, a replica takes the user's lease
  (a Redis lock, :meth:`ReplicaCoordinator.lease`) and answers every owed message of that user,
  oldest first, each reply generated from exactly the history before it. Whoever holds the
  lease answers everything owed, so it does not matter which replica's waiter gets in first (a
  Redis lock makes no promise about that).
- **/reset and /forget are stored in line** with the messages (``repository.RESET_ROLE``) and
  carried out by the lease holder in their place, after the replies before them: the webhook
  request never waits for a lease (it used to, and went ahead without one when the wait ran
  out, deleting history under a reply being written).
- **A replica that stalls** (a frozen VM, a stopped process) past ``REPLICA_LEASE_S`` loses its
  lease to a survivor. It must then neither send nor store anything more for that user: each
  Bot API call made under a lease and the storing of a reply first check the lease's deadline,
  kept on this replica's own monotonic clock (:func:`check_lease`), so the check needs no
  round trip and holds even when the stalled replica wakes up with a request ready to go.
- **Fencing tokens**: the deadline cannot tell a replica that Redis forgot its lock (a
  restart, a failover, an eviction) and gave it to another. Each grant of a lease therefore
  takes the user's next *fencing token* from the database (:class:`LeaseFence`, kept in
  ``users.lease_token``, which survives Redis), and only the newest token's holder acts: each
  Bot API call of a reply asks first (:func:`check_fence`), and a reply, its draft, a settled
  mark and a /reset are stored in a transaction that finds the token still current. A replica
  that lost its lease stops before its next call and leaves the message to the new holder,
  which writes the reply into the message the first one had started.
- **A replica that dies** stops renewing its leases: they expire after ``REPLICA_LEASE_S``, and
  every replica's sweep (:meth:`bot.conversation.Conversations.sweep_forever`) picks owed
  messages whose lease is free. The reply the dead replica was streaming is not sent again as a
  second message: the Telegram id of the message it was writing into (the *draft*) is stored
  with the user's message in the database (``messages.reply_draft_id``, as for a single bot's
  restart), and the survivor writes its reply into that same message.
- A message answered with a notice (the model busy or too slow), or whose chat refuses the
  bot, is marked *settled* in the database (``messages.settled_at``), so that the sweep does not
  answer it again and again.

Why a lease of our own rather than aiogram's ``RedisEventIsolation``: that lock wraps one update's
handler and lets waiting updates in in any order, and it cannot hand a dead replica's unfinished
reply to another replica. The Redis primitives are redis-py's (``Lock`` with its Lua scripts for
acquire/extend/release), nothing hand-rolled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError

from bot.config import ConfigError

logger = logging.getLogger(__name__)

PREFIX = "tgbot"
# The lease is taken to end this share of REPLICA_LEASE_S before Redis lets it go, for the time
# a request to Redis takes and for clocks that do not run at exactly the same rate.
LEASE_MARGIN = 0.1


class LeaseLost(Exception):
    """This replica's lease on a user ran out while it was working for them (it stalled longer
    than REPLICA_LEASE_S): another replica may be answering them now."""


class LeaseFence(Protocol):
    """Where fencing tokens are granted and checked: somewhere that outlives Redis's data (the
    bot's database, ``bot.dialogue.DialogueService``)."""

    async def grant_lease_token(self, user_id: int) -> int:
        """A token greater than every one granted for ``user_id`` before."""
        ...

    async def holds_lease_token(self, user_id: int, token: int) -> bool:
        """Whether ``token`` is still the newest granted for ``user_id``."""
        ...


@dataclass
class HeldLease:
    """A user's lease as this replica holds it: until ``deadline`` (``time.monotonic()``), Redis
    gives it to nobody else, as long as Redis keeps its data; ``token``: the fencing token
    granted with it (``None`` without a :class:`LeaseFence`), which tells even then."""

    user_id: int
    deadline: float
    token: int | None = None
    fence: LeaseFence | None = None

    def check(self) -> None:
        overdue = time.monotonic() - self.deadline
        if overdue >= 0:
            raise LeaseLost(f"the lease on user {self.user_id} ran out {overdue:.1f} s ago")

    def lost_to_a_newer_token(self) -> LeaseLost:
        return LeaseLost(
            f"another replica holds the lease on user {self.user_id} now (this one's fencing "
            f"token {self.token} is not the newest)"
        )


_held: ContextVar[HeldLease | None] = ContextVar("held_lease", default=None)


def check_lease() -> None:
    """Raise :class:`LeaseLost` when the work in progress runs under a lease that has run out;
    nothing outside a lease (one process, no replicas). Tasks started under a lease (a reply's
    stream) inherit it."""
    held = _held.get()
    if held is not None:
        held.check()


def current_lease() -> HeldLease | None:
    """The lease the work in progress runs under (``None``: one process, or no lease)."""
    return _held.get()


async def check_fence() -> None:
    """:func:`check_lease`, then whether the lease's fencing token is still the newest (one
    round trip to the database): before each Bot API call of a reply."""
    held = _held.get()
    if held is None:
        return
    held.check()
    fence, token = held.fence, held.token
    if (
        fence is not None
        and token is not None
        and not await fence.holds_lease_token(held.user_id, token)
    ):
        raise held.lost_to_a_newer_token()


class ReplicaCoordinator:
    """Users' leases, shared by all replicas through Redis."""

    def __init__(
        self, redis: Redis, lease_s: float, wait_s: float, fence: LeaseFence | None = None
    ) -> None:
        self.redis = redis
        self.lease_s = lease_s  # how long a dead replica's lease outlives it
        self.wait_s = wait_s  # longest wait for a user's lease before leaving it to the sweep
        self.fence = fence  # grants each lease its fencing token (set once the database is open)

    @classmethod
    async def connect(
        cls, url: str, lease_s: float, wait_s: float, fence: LeaseFence | None = None
    ) -> ReplicaCoordinator:
        """Connect and check the server answers: a wrong REDIS_URL fails at start, in one line."""
        redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        try:
            await redis.ping()
        except (RedisError, OSError) as error:
            await redis.aclose()
            raise ConfigError(f"REDIS_URL: cannot reach Redis ({error})") from None
        return cls(redis, lease_s, wait_s, fence)

    async def aclose(self) -> None:
        await self.redis.aclose()

    @contextlib.asynccontextmanager
    async def lease(self, user_id: int, *, wait: bool = True) -> AsyncIterator[HeldLease | None]:
        """Hold the user's lease while the body runs; yields None when it could not be had
        (``wait=False`` and someone holds it, or ``wait_s`` passed).

        The lease is renewed every third of ``lease_s`` while held, so a reply may take as long
        as it takes, and a replica that dies frees its users within ``lease_s``. While the body
        runs, :func:`check_lease` tells whether the lease is still this replica's.
        """
        lock = self.redis.lock(
            f"{PREFIX}:lease:{user_id}",
            timeout=self.lease_s,
            sleep=0.05,
            blocking=wait,
            blocking_timeout=self.wait_s if wait else None,
            raise_on_release_error=False,
        )
        if not await lock.acquire():
            yield None
            return
        held = HeldLease(user_id, self._deadline(time.monotonic()), fence=self.fence)
        if self.fence is not None:
            try:
                held.token = await self.fence.grant_lease_token(user_id)
            except BaseException:
                with contextlib.suppress(LockError, RedisError):
                    await lock.release()
                raise
        token = _held.set(held)
        done = asyncio.Event()
        renewal = asyncio.create_task(self._renew(lock, held, done))
        try:
            yield held
        finally:
            _held.reset(token)
            # The renewal is told to stop, never cancelled: redis-py's asyncio client can
            # swallow the cancellation of a command in flight (measured: a cancelled
            # ``lock.extend`` returned normally in 130 of 300 tries), and the renewal then
            # went on renewing a lease nobody used, for as long as the replica lived (the
            # user's messages waited: seen in the replica tests). Shielded, so a shutdown
            # cancelling this task does not cancel the renewal either; the lease is released
            # in any case.
            done.set()
            try:
                await asyncio.shield(renewal)
            finally:
                with contextlib.suppress(LockError, RedisError):
                    await lock.release()

    def _deadline(self, asked_at: float) -> float:
        return asked_at + self.lease_s * (1 - LEASE_MARGIN)

    async def _renew(self, lock: Lock, held: HeldLease, done: asyncio.Event) -> None:
        """Extend the lease every third of ``lease_s`` until ``done`` is set (at most one
        extension in flight then, bounded by the client's timeouts)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.lease_s / 3)
            if done.is_set():
                return
            asked_at = time.monotonic()  # Redis counts the new term from later than this
            try:
                await lock.extend(self.lease_s, replace_ttl=True)
            except LockError as error:
                # Stalled longer than the lease: another replica may answer this user meanwhile.
                # The deadline is left to run out: check_lease stops the work under way before
                # it sends or stores anything more.
                logger.warning("lost the lease on user %s: %s", held.user_id, error)
                return
            except RedisError as error:  # a blip: try again; only a success moves the deadline
                logger.warning("could not renew the lease on user %s: %s", held.user_id, error)
                continue
            held.deadline = self._deadline(asked_at)
