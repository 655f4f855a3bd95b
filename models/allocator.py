"""Give the memory freed while loading a model back to the system (glibc's ``malloc``).

Loading converts the checkpoint one tensor at a time (int8 quantization, oneDNN packing): each
float32 weight (4–200 MB) is read, converted and freed. glibc serves an allocation that large
with its own ``mmap`` and unmaps it when freed — but the first such free raises its *dynamic*
mmap threshold to that size (up to 32 MB), after which same-sized blocks come from the heap, and
freed heap memory stays resident. Measured loading the medium shape with ``MODEL_QUANTIZE=int8``:
1086 MB resident afterwards with the default behaviour, 893 MB with the threshold held at
128 KiB, for the same model.

So :func:`returning_freed_memory` pins the threshold low while loading, and afterwards pins it
at the dynamic threshold's own ceiling, so that serving reuses its per-step buffers from the heap
(no page faults per step) exactly as it did. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Iterator
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
LOADING_THRESHOLD = 128 * 1024  # glibc's initial value
SERVING_THRESHOLD = 32 * 1024 * 1024  # the most the dynamic threshold would rise to


def _mallopt() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return getattr(libc, "mallopt", None)


@contextmanager
def returning_freed_memory() -> Iterator[None]:
    """Within the block, large freed blocks go back to the system at once."""
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, LOADING_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, SERVING_THRESHOLD)
