"""Another thread's OpenMP pool, and how the engine notices and undoes the slowdown it causes.

PyTorch's Linux builds run their parallel loops on libgomp. Each thread that starts a parallel
operation gets a pool of helper threads of its own, kept until that thread exits, and libgomp
counts the helpers of every pool. Once they outnumber the CPUs, every team's threads wait for
each other by spinning only 100 times (instead of ``GOMP_SPINCOUNT``, ``bot/__init__.py``) and
then sleeping, so each of a step's few hundred products pays to wake a helper. One multi-threaded
torch operation in the event loop's thread is enough, and nothing else shows it. Measured with
RuGPT-3 medium's shape on a 2-core AVX512 CPU, one row, after a 1000x1000 matrix product in the
main thread: bfloat16 step 24.8 -> 39.3 ms with ~110 voluntary context switches of the worker a
step (0 before); int8 16.4 -> 30.5 ms; 8 users in bfloat16 39.3 -> 61.8 ms (67 a step).

That is why the bot loads models in a thread that exits (``run_in_own_thread``). Where some other
code runs a parallel operation anyway, the worker sees it: its voluntary context switches per
decoding step (:class:`StallWatch`). A process competing for the cores raises them too (a team's
thread waits for a preempted sibling until it sleeps), but then the worker is preempted as well:
measured on the medium shape, 8 users in bfloat16, two-thread steps with one busy process beside
the engine had 117 voluntary and 65 involuntary switches a step; with the slowdown on idle cores
161 voluntary and 0.5 involuntary (one user: 118 and 0.0). Both are an episode of sleeping
threads; the worker's warning says which cause is likelier: sleeps that outnumber its
preemptions :data:`SLEEPS_PER_PREEMPTION` to one point at another thread's pool, fewer at a busy
machine (where the slowdown, if there too, cannot be told apart; the thread tuner of
``bot.engine.threads`` answers a busy machine with fewer threads). The cure for the slowdown is
for the thread that owns the pool to free it, :func:`release_thread_pool`; the engine asks the
event loop's thread to (the usual culprit) and names the cause for any other thread. Measured:
after the release, 18.4 -> 12.9 ms a step (int8, one row), 114 -> 0 switches; in the bot's
engine (bfloat16, one user), the stalled steps' median 32.4 ms, the cured ones' 24.1.
"""

from __future__ import annotations

import ctypes
import functools
import resource
from collections import deque
from pathlib import Path

#: ``omp_pause_soft`` of OpenMP 5's ``omp_pause_resource_t``.
_PAUSE_SOFT = 1


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp this process has loaded (PyTorch's own copy), or None where it has another
    OpenMP runtime or none: only libgomp's pause is known to free just the calling thread's pool
    (LLVM's libomp pauses the whole runtime, the worker's team included)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
        path = fields[5] if len(fields) == 6 else ""
        if Path(path).name.startswith("libgomp"):
            library = ctypes.CDLL(path)  # already loaded: the same instance, not a second one
            if hasattr(library, "omp_pause_resource_all"):
                return library
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP helper threads (libgomp); whether it could.

    The pool comes back, at no more cost than its first creation, if this thread starts a parallel
    operation again. Call it only from Python (never inside a parallel region, which Python code
    cannot be in)."""
    library = _libgomp()
    if library is None:
        return False
    return library.omp_pause_resource_all(_PAUSE_SOFT) == 0


def context_switches() -> tuple[int, int] | None:
    """How often the calling thread has gone to sleep of its own accord, and how often it was
    preempted: ``(voluntary, involuntary)`` (Linux; else None)."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    if who is None:
        return None
    usage = resource.getrusage(who)
    return usage.ru_nvcsw, usage.ru_nivcsw


#: Voluntary context switches per layer per step that mean sleeping threads. With the slowdown
#: nearly every parallel product of a step sleeps (~4 a layer): measured on the medium shape 4.6
#: a layer at one row, 2.8 at eight; 4 layers 256 wide, 1.3 to 5 a layer. Without it, and on
#: idle cores, 0.0 to 0.7 a step on the medium shape; small models see a few a step when another
#: process takes a core, whence a threshold well above one a layer.
SWITCHES_PER_LAYER = 2.0
#: How many times its voluntary switches must outnumber the worker's involuntary ones for them
#: to point at another thread's pool rather than a busy machine (measured 322 to 1 and more
#: against 1.8 to 1, module docstring).
SLEEPS_PER_PREEMPTION = 10


class StallWatch:
    """Whether the worker's decoding steps wait on sleeping OpenMP threads: a mean of at least
    :data:`SWITCHES_PER_LAYER` voluntary context switches per layer per step over the last
    ``window`` steps that ran on more than one thread; and whether preemptions came with them
    (:attr:`busy_machine`)."""

    def __init__(self, layers: int, window: int = 16) -> None:
        self.threshold = SWITCHES_PER_LAYER * max(1, layers)
        self._switches: deque[tuple[int, int]] = deque(maxlen=window)
        self.stalled = False
        self.episodes = 0

    @property
    def mean(self) -> float:
        """Voluntary switches per step over the window (0 before any step)."""
        return sum(v for v, _ in self._switches) / len(self._switches) if self._switches else 0.0

    @property
    def preempted(self) -> float:
        """Involuntary switches per step over the window (0 before any step)."""
        return sum(i for _, i in self._switches) / len(self._switches) if self._switches else 0.0

    @property
    def busy_machine(self) -> bool:
        """Whether the window's sleeps came with the worker's preemptions: other processes
        taking the cores, more likely than another thread's pool (module docstring)."""
        return self.mean < SLEEPS_PER_PREEMPTION * self.preempted

    def step(self, voluntary: int, involuntary: int, threads: int) -> bool:
        """Record a decoding step's switches; True when a stall begins (once per episode: it
        ends when a full window's voluntary mean falls below half the threshold)."""
        if threads <= 1:  # no team, nothing to wait for; a tuner's one-thread step says nothing
            return False
        self._switches.append((voluntary, involuntary))
        full = len(self._switches) == self._switches.maxlen
        mean = self.mean
        if not self.stalled and full and mean >= self.threshold:
            self.stalled = True
            self.episodes += 1
            return True
        if self.stalled and full and mean < self.threshold / 2:
            self.stalled = False
        return False

    def restart(self) -> None:
        """Forget the window (after a cure: the next verdict comes from new steps only)."""
        self._switches.clear()
