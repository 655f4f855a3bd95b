"""Deterministic train/val/test assignment by a hash of the dialogue.

Hashing the normalised text (rather than shuffling with a seed) means the same dialogue lands in
the same split whatever else the file holds, in whatever order: adding data later never moves an
old validation dialogue into training, and two near-identical dialogues cannot straddle splits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SPLIT_NAMES = ("train", "val", "test")


def dialogue_digest(key: str) -> int:
    """A stable 64-bit hash (Python's ``hash`` is salted per process, so it cannot be used)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class SplitRatios:
    """Shares of train/val/test in percent, e.g. 90/5/5 or 70/30/0."""

    train: float
    val: float
    test: float

    @classmethod
    def parse(cls, text: str) -> SplitRatios:
        """Parse ``"90/5/5"``; the three shares must be non-negative and add up to 100."""
        parts = text.split("/")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 3 or any(v < 0 for v in values):
            raise ValueError(f"split must be three non-negative numbers like 90/5/5, got {text!r}")
        if abs(sum(values) - 100) > 1e-6:
            raise ValueError(f"split shares must add up to 100, got {text!r} = {sum(values):g}")
        if values[0] == 0:
            raise ValueError(f"the train share must be above 0, got {text!r}")
        return cls(*values)

    def assign(self, digest: int) -> str:
        """The split for a dialogue whose :func:`dialogue_digest` is ``digest``."""
        position = digest / 2**64 * 100
        if position < self.train:
            return "train"
        if position < self.train + self.val:
            return "val"
        return "test" if self.test > 0 else "val"

    def __str__(self) -> str:
        return f"{self.train:g}/{self.val:g}/{self.test:g}"
