"""A user's lease (bot.replicas) against a real Redis: it ends when the work under it ends."""

import asyncio
import random

from bot.replicas import ReplicaCoordinator


async def test_a_lease_ends_with_its_work_even_with_a_renewal_in_flight(redis_url):
    """Leases renewed every 10 ms, each held for a random moment: every one ends with its work,
    whenever the work ends relative to a renewal. A renewal used to be stopped by cancelling
    it, and redis-py can swallow the cancellation of a command in flight: the renewal then went
    on for ever, the lease stayed taken and that user's messages waited (replica tests)."""
    coordinator = await ReplicaCoordinator.connect(redis_url, lease_s=0.03, wait_s=5)
    rng = random.Random(17)

    async def work(seconds: float) -> None:
        async with coordinator.lease(7) as held:
            assert held is not None
            await asyncio.sleep(seconds)

    try:
        for attempt in range(300):
            task = asyncio.create_task(work(rng.random() * 0.05))
            finished, _ = await asyncio.wait([task], timeout=10)
            assert finished, f"lease {attempt}: not given up 10 s after its work ended"
            await task
            renewing = [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_renew"]
            assert renewing == [], f"lease {attempt}: its renewal outlived it"
    finally:
        await coordinator.aclose()
