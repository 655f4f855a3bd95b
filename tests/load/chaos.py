"""`make test-chaos`: each fault of ``tests/bot/chaos_faults.py`` several times, then one line.

    python -m tests.load.chaos                  # every fault, 5 runs each
    python -m tests.load.chaos --runs 2 -- -k redis

Prints each run's counts, then ``chaos: R runs, M messages, F faults, lost L, shown twice T,
out of order O, orphans X`` and exits with pytest's status (non-zero when any count is not 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FAULT_TESTS = "tests/bot/chaos_faults.py"


def summary(results: list[dict]) -> str:
    total = {k: sum(r[k] for r in results) for k in ("messages", "lost", "shown_twice")}
    total |= {k: sum(r[k] for r in results) for k in ("out_of_order", "orphans")}
    twice = total["shown_twice"] + sum(r.get("answered_twice", 0) for r in results)
    return (
        f"chaos: {len(results)} runs, {total['messages']} messages, {len(results)} faults, "
        f"lost {total['lost']}, shown twice {twice}, out of order {total['out_of_order']}, "
        f"orphans {total['orphans']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.chaos", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="runs of each fault")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "chaos.jsonl"
        env = {**os.environ, "CHAOS_RUNS": str(args.runs), "CHAOS_RESULTS": str(report)}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", FAULT_TESTS]
        code = subprocess.call([*command, *args.pytest_args], env=env)
        lines = report.read_text().splitlines() if report.exists() else []
    results = [json.loads(line) for line in lines]
    for r in results:
        print(
            f"  {r['fault']:<18} run {r['run']}: lost {r['lost']}, shown twice "
            f"{r['shown_twice'] + r['answered_twice']}, out of order {r['out_of_order']}, "
            f"orphans {r['orphans']} ({r['seconds']} s)"
        )
    print(summary(results))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
