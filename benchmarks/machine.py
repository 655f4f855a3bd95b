"""What machine a benchmark figure came from: stored with every ``--json`` result.

A figure without its machine cannot be compared with anything: these machines change CPU model
from session to session (AVX2-only Zen 3, AVX-512 Zen 4/5 with bfloat16), and a bfloat16 figure
of one is meaningless on the other. So each result carries the CPU model, the instruction-set
flags that decide which kernels run, cores, memory, the accelerator, the library versions, the
commit of the code that ran, and when.
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: The CPU flags that change which code paths run (oneDNN's bfloat16 packing, VNNI int8, the
#: attention kernel's AVX2/AVX-512 builds).
FLAGS_THAT_MATTER = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
)

ROOT = Path(__file__).resolve().parent.parent


def _cpuinfo() -> tuple[str, list[str]]:
    """The CPU's model name and the flags of :data:`FLAGS_THAT_MATTER` it has (Linux). A
    virtual machine may name only the vendor's line ("AMD EPYC"): the family and model numbers
    are added, since they tell the generations apart (family 25: Zen 3/4, 26: Zen 5)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), []
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip():  # the first processor's block is enough
            break
    model = fields.get("model name", platform.machine())
    if "cpu family" in fields:
        model += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    flags = set(fields.get("flags", "").split())
    return model, [flag for flag in FLAGS_THAT_MATTER if flag in flags]


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def _git_commit() -> str | None:
    """The commit that ran, with ``-dirty`` when the work tree had changes."""
    try:
        commit = _git("rev-parse", "--short=12", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def describe_machine() -> dict[str, Any]:
    """This machine and software, as stored beside a benchmark's figures."""
    import torch
    import transformers

    model, flags = _cpuinfo()
    accelerator = None
    if torch.cuda.is_available():
        accelerator = torch.cuda.get_device_name(0)
    return {
        "cpu": model,
        "cpu_flags": flags,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "accelerator": accelerator,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def machine_label(machine: dict[str, Any]) -> str:
    """A short name of a machine for a table's heading: CPU, cores, accelerator."""
    label = f"{machine['cpu']}, {machine['cores']} cores ({machine['cpu_capability']})"
    if machine.get("accelerator"):
        label += f", {machine['accelerator']}"
    return label
