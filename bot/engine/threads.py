"""How many threads the engine's CPU worker uses, chosen from its own measured steps.

Two threads on two idle cores decode twice as fast as one, but only while the threads find each
other quickly between the hundreds of small matrix products of a step, and only while both
cores are theirs. Measured with RuGPT-3 medium's shape, int8, 8 users, on a 2-core AVX512 CPU
(``python -m bot.engine.bench``, steps of the batch):

================================  ===========  ========================
threads, OpenMP waiting            idle cores   one busy process beside
================================  ===========  ========================
2, sleeping at once (PASSIVE)      84 ms        79 ms
2, spinning 3,000 times first      45 ms        133 ms
2, spinning 30,000 times first     44 ms        365 ms
1                                  82 ms        66 ms
================================  ===========  ========================

No fixed setting is right for both columns: a thread that waits by spinning burns the core its
descheduled sibling needs; one that sleeps at once pays a wake-up at every product. So the
bot lets OpenMP spin briefly (``bot/__init__.py``) and the worker measures: every so often it
times a few consecutive decoding steps of the same batch at each candidate thread count,
alternating (so the batch and the other programs are the same for each), and keeps the
fastest. A trial that finds another count faster is repeated at once, and the count changes
only when the repeat agrees: two steps a candidate are few on a host whose memory bandwidth
varies from one second to the next, and one wrong switch costs dearly (a bench run whose bfloat16
engine ended on one thread stepped 8 rows in 65.8 ms, median, where six runs that kept two took
31-38 ms; in the first trials on short contexts one thread was only 1.2-1.5x slower, close to the
margin). A choice that holds is checked again less and less often (up to once a minute); one
that changes is checked again soon. ``ENGINE_THREADS`` fixes the count and turns this off.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: Timed steps per candidate in one trial (alternating), and the gain a change needs.
STEPS_PER_CANDIDATE = 2
MARGIN = 0.9


class ThreadTuner:
    """Which thread count the next step uses; told how long each decoding step took."""

    def __init__(
        self,
        most: int,
        *,
        first_trial_s: float = 2.0,
        longest_wait_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.candidates = sorted({most, max(1, most // 2), 1}, reverse=True)
        self.current = most
        self.trials = 0  # trials completed
        self.changes = 0  # of them, those that changed the count
        self._clock = clock
        self._first_wait_s = first_trial_s
        self._longest_wait_s = longest_wait_s
        self._wait_s = first_trial_s
        self._next_trial_at = clock() + first_trial_s
        self._plan: list[int] = []  # thread counts of the trial's remaining steps
        self._shape: object = None  # the batch the trial times (steps must all match it)
        self._timings: dict[int, list[float]] = {}
        self._pending: int | None = None  # the count the step being timed runs with
        self._proposed: int | None = None  # faster in the last trial; the next must agree

    def try_soon(self) -> None:
        """Start a trial at the next decoding step (not waiting for the next one due)."""
        self._next_trial_at = self._clock()

    @property
    def trying(self) -> bool:
        return bool(self._plan) or self._pending is not None

    def threads_for(self, shape: object) -> int:
        """The thread count for a decoding step of this batch ``shape`` (rows; hashable)."""
        if self._pending is not None:  # the last step went unreported: not a timed one
            self._abandon()
        if not self._plan and len(self.candidates) > 1 and self._clock() >= self._next_trial_at:
            rounds = [c for _ in range(STEPS_PER_CANDIDATE) for c in self.candidates]
            self._plan, self._shape, self._timings = rounds, shape, {}
        if not self._plan:
            return self.current
        if shape != self._shape:  # the batch changed: timings would not compare
            self._abandon()
            return self.current
        self._pending = self._plan.pop(0)
        return self._pending

    def step_took(self, seconds: float) -> None:
        """The duration of the step :meth:`threads_for` was just asked for."""
        if self._pending is None:
            return
        self._timings.setdefault(self._pending, []).append(seconds)
        self._pending = None
        if not self._plan:
            self._decide()

    def other_step(self) -> None:
        """A step that is not a plain decoding step (a prompt's chunk rides along): a trial
        in progress is dropped, as its steps would not compare."""
        if self.trying:
            self._abandon()

    def _decide(self) -> None:
        self.trials += 1
        medians = {n: statistics.median(times) for n, times in self._timings.items()}
        best = min(medians, key=medians.__getitem__)
        if best != self.current and medians[best] < MARGIN * medians[self.current]:
            if self._proposed != best:  # not yet confirmed: try again at the next step
                self._proposed, self._next_trial_at = best, self._clock()
                return
            self._proposed = None
            logger.info(
                "engine threads %d -> %d (a step %.1f ms against %.1f ms)",
                self.current,
                best,
                medians[best] * 1e3,
                medians[self.current] * 1e3,
            )
            self.current, self._wait_s = best, self._first_wait_s
            self.changes += 1
        else:
            self._proposed = None
            self._wait_s = min(2 * self._wait_s, self._longest_wait_s)
        self._next_trial_at = self._clock() + self._wait_s

    def _abandon(self) -> None:
        self._plan, self._pending, self._timings = [], None, {}
        self._next_trial_at = self._clock() + self._first_wait_s / 4
