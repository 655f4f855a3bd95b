"""`make test-stress`: the whole test suite while a CPU hog of our own keeps every core busy.

CI may run on a developer's machine that is doing other work; a test that passes only on a quiet
machine (it waited for one event and asserted on a later one) fails there. This runs pytest
beside ``--hogs`` busy processes (default: one per core, so the load average is about twice the
core count, as on the machine where such failures were first seen). The hogs stop when pytest
ends, and on their own after ``--max-seconds`` whatever happens. Extra arguments go to pytest.

    python -m tests.load.stress                 # the suite, as `make test` runs it
    python -m tests.load.stress -- -k reliability -x
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time


def burn(deadline: float) -> None:
    """Spin on integer arithmetic until ``deadline`` (``time.monotonic``, shared by processes)."""
    value = 1
    while time.monotonic() < deadline:
        for _ in range(100_000):
            value = (value * 48_271) % 2_147_483_647


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.stress", description=__doc__)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="busy processes")
    parser.add_argument(
        "--max-seconds", type=float, default=1800, help="the hogs stop by then in any case"
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.max_seconds
    hogs = [
        multiprocessing.Process(target=burn, args=(deadline,), daemon=True)
        for _ in range(args.hogs)
    ]
    for hog in hogs:
        hog.start()
    print(f"stress: {args.hogs} busy processes beside pytest (at most {args.max_seconds:.0f} s)")
    started = time.monotonic()
    try:
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", *args.pytest_args])
    finally:
        load = os.getloadavg()
        for hog in hogs:
            hog.terminate()
        for hog in hogs:
            hog.join()
    print(
        f"stress: pytest exited {code} after {time.monotonic() - started:.0f} s; "
        f"load average at the end {load[0]:.1f} (1 min), {load[1]:.1f} (5 min)"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
