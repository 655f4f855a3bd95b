"""Decoding attention on CPUs as one compiled kernel (``CPU_ATTENTION_KERNEL``, default ``auto``).

A decoding step attends each row's one new query over all of its row's cached keys/values:
per layer, a matrix-vector product over memory that is read once. PyTorch's CPU attention is
built for prefill (many queries): called once per row and layer it read the float32 cache at
~15 GB/s on a 2-core Zen 5 machine (a third of what the memory gives), and over a bfloat16
cache at 2-4 GB/s, which is why the engine kept bfloat16 models' keys/values in float32. This
kernel (``csrc/decode_attention.cpp``) writes each row's new key/value and attends, all rows and
heads of a layer in one call, reading keys and values where they lie in float32 or bfloat16 and
widening them in AVX-512 registers (AVX2 ones on CPUs without AVX-512). Measured for 24 layers
x 8 rows x ~300 positions (medium shape, same machine, one run): float32 cache 15 ms a step
against 29 ms for per-row ``scaled_dot_product_attention``; bfloat16 cache 8.4 ms against
88 ms. So a bfloat16 model's cache stays bfloat16: half the memory, and its step no longer waits
on attention.

It also reads a row's history where the prefix cache keeps it (the dialogue's chunks, one per
turn) instead of a copy in the row's slot (``SlotDecoder.load_slot``): a dialogue's keys/values
are held once while its next turn runs, not twice.

It is compiled on first use with PyTorch's C++ extension loader (``g++`` and the ``ninja``
package; ~30 s once, then loaded from ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) for the CPU it runs on (``-march=native``; the build's name
carries the CPU's feature flags, so a shared cache folder never hands one CPU's binary to
another). ``auto`` uses it on CPUs with AVX-512 or AVX2 and falls back to PyTorch's attention
(float32 cache) with one warning when it cannot be built; ``on`` refuses to start without it;
``off`` never builds it. Greedy replies are the same tokens either way (tests compare them).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.cpp"
MODES = ("auto", "on", "off")
#: Cache dtypes the kernel reads.
DTYPES = (torch.float32, torch.bfloat16)

#: ``(queries, new_keys, new_values, keys, values, slots, ends, scale) -> [rows, heads, dim]``:
#: queries, keys and values ``[rows, heads, head_dim]``; keys/values the layer's slot cache
#: ``[slots, heads, capacity, head_dim]``; row i's new key/value goes to position ``ends[i]-1``
#: of slot ``slots[i]`` and its query attends over positions ``0..ends[i]-1``.
DecodeAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list, list, float],
    torch.Tensor,
]


class KernelUnavailable(RuntimeError):
    """The kernel cannot be used here; the message says why in one line."""


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), what ``-march=native`` compiles for."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability()


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built here, or None. Checked before trying, so that ``auto``
    says the reason instead of a compiler's error."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AVX2"):
        return f"it is vectorised for AVX-512 and AVX2 and this CPU offers {capability}"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (g++) is installed"
    try:
        import ninja  # noqa: F401  (the extension loader runs its binary)
    except ImportError:
        return "the ninja package is not installed (pip install ninja)"
    return None


def load(march: str = "native") -> DecodeAttention:
    """Build (first time) or load the kernel for this CPU; :class:`KernelUnavailable` if not.

    ``march``: the instruction set to compile for (gcc's ``-march``); ``native`` is this CPU's.
    Another one serves to run the AVX2 build on an AVX-512 CPU (``x86-64-v3``), as the tests do.
    """
    built = _build(march)
    if isinstance(built, KernelUnavailable):
        raise KernelUnavailable(str(built))
    return built


@functools.cache
def _build(march: str) -> DecodeAttention | KernelUnavailable:
    """Tried once per process and ``march``: a failed build is not retried at every start."""
    if reason := unavailable_reason():
        return KernelUnavailable(reason)
    from torch.utils.cpp_extension import load_inline

    source = SOURCE.read_text()
    target = _cpu_flags() if march == "native" else march
    key = hashlib.sha256(f"{source}\n{target}\n{torch.__version__}".encode()).hexdigest()
    logger.info("loading the CPU attention kernel (compiled once, ~30 s, then cached)")
    # -fopenmp: at::parallel_for's inline OpenMP region; the libgomp it links is the one torch
    # has loaded (same soname), so the kernel shares PyTorch's thread pool (measured: 2 threads
    # 8.4 ms, 1 thread 12.8 ms). -ffast-math lets the scalar tails vectorise and exp() use the
    # vector library; keys, values and queries are finite, which is all it assumes.
    try:
        module = load_inline(
            name=f"decode_attention_{key[:16]}",
            cpp_sources=source,
            functions=["decode_attention"],
            extra_cflags=["-O3", f"-march={march}", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # a compiler's failure comes as several exception types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        logger.debug("CPU attention kernel build failed", exc_info=True)
        return KernelUnavailable(f"it did not build: {first_line}")
    return module.decode_attention


def decode_attention_for(model: torch.nn.Module, mode: str = "auto") -> DecodeAttention | None:
    """The kernel the engine should use for ``model`` under ``CPU_ATTENTION_KERNEL=mode``.

    None on a GPU, for a cache dtype the kernel does not read, with ``off``, and with ``auto``
    where it cannot be had (logged once); ``on`` raises :class:`KernelUnavailable` instead.
    """
    if mode not in MODES:
        raise ValueError(f"CPU_ATTENTION_KERNEL must be one of {', '.join(MODES)}, not {mode!r}")
    weight = model.get_input_embeddings().weight
    if mode == "off" or weight.device.type != "cpu":
        return None
    if weight.dtype not in DTYPES:
        if mode == "on":
            raise KernelUnavailable(f"the kernel reads float32 or bfloat16, not {weight.dtype}")
        return None
    try:
        return load()
    except KernelUnavailable as error:
        if mode == "on":
            raise KernelUnavailable(f"CPU_ATTENTION_KERNEL=on, but {error}") from error
        logger.warning(
            "CPU attention kernel not used (%s): decoding attends with PyTorch's kernels, "
            "slower, and a bfloat16 model keeps its keys/values in float32",
            error,
        )
        return None


def main() -> int:
    """Build the kernel now and say whether it is usable: ``make install`` runs this, so that
    the bot's first start (and a test suite's many bot processes) does not wait for the
    compiler."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        load()
    except KernelUnavailable as error:
        print(f"CPU attention kernel: not used here ({error}); PyTorch's attention serves instead")
        return 0
    print("CPU attention kernel: ready")
    return 0
