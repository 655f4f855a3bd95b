"""Each dialogue's keys and values, kept between turns so the next turn encodes only what is new.

On a CPU the cost of a chat turn is mostly re-reading the history (a 400-token prefill of the
medium model takes ~2.8 s here; the 20 new tokens of a user's message, 0.3 s). So after a reply,
the engine keeps what the model computed for the prompt and the reply, keyed by dialogue, and the
next turn starts from it (prefix caching, as vLLM and SGLang do).

The memory is bounded by a byte budget (``KV_CACHE_MB``): past it, the least recently used
dialogues are dropped; a dialogue that alone exceeds the budget is not kept. An entry remembers
the exact text its tokens spell, which is how the engine knows it is still a prefix of the next
prompt (see ``GenerationEngine._encode``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

#: A dialogue keeps at most this many chunks; past it they are joined into one (a rare copy).
MAX_CHUNKS = 16


@dataclass(frozen=True)
class CachedDialogue:
    """A dialogue's tokens and the keys/values of the first ``computed`` of them.

    The keys/values are a sequence of chunks, one per turn, because keeping a finished turn
    must not copy the whole dialogue: a fresh 60 MB tensor (300 positions of the medium model)
    comes from ``mmap`` and costs its page faults, ~60 ms on the 2-core test machine, against
    under 1 ms to copy the ~60 positions a turn adds. The leading ``shared`` chunks belong to
    another entry (the persona every dialogue starts with): they are not counted against the
    budget again.
    """

    text: str  # the prompt and reply text these tokens spell
    ids: list[int]
    chunks: tuple[torch.Tensor, ...]  # each [layers, 2, heads, n, head_dim], in order
    shared: int = 0

    @property
    def computed(self) -> int:
        return sum(chunk.shape[3] for chunk in self.chunks)

    @property
    def nbytes(self) -> int:
        return sum(chunk.numel() * chunk.element_size() for chunk in self.chunks[self.shared :])

    def prefix(self, length: int) -> Prefix:
        """The chunks that hold the first ``length`` positions (a row starts from them).

        A chunk cut short is copied, so that no entry holds memory it does not count.
        """
        kept: list[torch.Tensor] = []
        for index, chunk in enumerate(self.chunks):
            if length <= 0:
                break
            if chunk.shape[3] <= length:
                kept.append(chunk)
            else:
                kept.append(chunk[:, :, :, :length].clone())
                return Prefix(tuple(kept), min(self.shared, index))
            length -= chunk.shape[3]
        return Prefix(tuple(kept), min(self.shared, len(kept)))


@dataclass(frozen=True)
class Prefix:
    """The keys/values a row was started from: the leading part of a cached dialogue."""

    chunks: tuple[torch.Tensor, ...] = ()
    shared: int = 0  # leading chunks owned by another entry (see CachedDialogue)

    @property
    def length(self) -> int:
        return sum(chunk.shape[3] for chunk in self.chunks)

    def extended(self, text: str, ids: list[int], new: torch.Tensor) -> CachedDialogue:
        """The dialogue's entry after this turn: these chunks, then the turn's own ``new``."""
        chunks = (*self.chunks, new)
        if len(chunks) > MAX_CHUNKS:
            chunks = (*chunks[: self.shared], torch.cat(chunks[self.shared :], dim=3))
        return CachedDialogue(text, ids, chunks, self.shared)


class PrefixCache:
    """Dialogue key → :class:`CachedDialogue`, least recently used first out past the budget.

    Thread-safe: the worker thread takes and puts entries; the event loop drops them on
    ``/reset`` and ``/forget``.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, CachedDialogue] = OrderedDict()
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def take(self, key: Hashable) -> CachedDialogue | None:
        """Remove and return the entry (its row now owns it; it comes back with :meth:`put`)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.used_bytes -= entry.nbytes
            return entry

    def put(self, key: Hashable, entry: CachedDialogue) -> None:
        """Keep ``entry`` as the most recently used, evicting the oldest to stay in budget."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used_bytes -= old.nbytes
            if entry.nbytes > self.budget_bytes:
                return
            while self._entries and self.used_bytes + entry.nbytes > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.used_bytes -= evicted.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self.used_bytes += entry.nbytes

    def take_longest_prefix(self, prompt: str | list[int]) -> CachedDialogue | None:
        """Remove and return the entry with the longest text (or tokens) that ``prompt`` extends.

        For clients that name no dialogue (an HTTP client that sends the whole conversation
        each time): the entry its previous turn left is found by content. One pass over the
        entries; each comparison stops at the first differing character, in C.
        """
        with self._lock:
            best: Hashable | None = None
            longest = 0
            for key, entry in self._entries.items():
                if isinstance(prompt, str):
                    size = len(entry.text)
                    extends = size < len(prompt) and prompt.startswith(entry.text)
                else:
                    size = len(entry.ids)
                    extends = size < len(prompt) and prompt[:size] == entry.ids
                if extends and size > longest:
                    best, longest = key, size
            if best is None:
                return None
            entry = self._entries.pop(best)
            self.used_bytes -= entry.nbytes
            return entry

    def forget(self, key: Hashable) -> None:
        """Drop a dialogue's entry (its history was reset or deleted)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.used_bytes -= entry.nbytes


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count
