"""`make test-chaos`: each fault of ``tests/bot/chaos_faults.py`` several times, then one line.

    python -m tests.load.chaos                  # every fault, 5 runs each
    python -m tests.load.chaos --runs 2 -- -k redis

Prints each run's counts, then ``chaos: R runs, M messages, F faults, lost L, shown twice T,
out of order O, orphans X`` and exits with pytest's status (non-zero when any count is not 0).
``--json FILE`` also writes the counts per fault with the machine they came from, a run for
``benchmarks/results/`` (``make bench-report`` renders it into docs/benchmarks.md).
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


COUNTS = ("runs", "messages", "lost", "shown_twice", "out_of_order", "orphans")


def _shown_twice(run: dict) -> int:
    """Replies on screen twice, and messages answered twice in the database."""
    return run["shown_twice"] + run.get("answered_twice", 0)


def by_fault(results: list[dict]) -> dict[str, dict[str, int]]:
    """Each fault's counts over its runs, in the order the faults ran."""
    faults: dict[str, dict[str, int]] = {}
    for r in results:
        f = faults.setdefault(r["fault"], dict.fromkeys((*COUNTS, "runs_with_orphans"), 0))
        f["runs"] += 1
        f["shown_twice"] += _shown_twice(r)
        for count in ("messages", "lost", "out_of_order", "orphans"):
            f[count] += r[count]
        f["runs_with_orphans"] += int(r["orphans"] > 0)
    return faults


def summary(results: list[dict]) -> str:
    faults = by_fault(results).values()
    total = {count: sum(f[count] for f in faults) for count in COUNTS}
    return (
        f"chaos: {total['runs']} runs, {total['messages']} messages, {total['runs']} faults, "
        f"lost {total['lost']}, shown twice {total['shown_twice']}, out of order "
        f"{total['out_of_order']}, orphans {total['orphans']}"
    )


def write_json(path: Path, runs: int, results: list[dict]) -> None:
    from benchmarks.machine import describe_machine
    from tests.bot.chaos_faults import MESSAGES, USERS

    document = {
        "benchmark": "chaos",
        "machine": describe_machine(),
        "settings": {"runs": runs, "users": len(USERS), "messages": MESSAGES},
        "faults": by_fault(results),
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.chaos", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="runs of each fault")
    parser.add_argument("--json", type=Path, help="also write the counts for benchmarks/results/")
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
            f"{_shown_twice(r)}, out of order {r['out_of_order']}, "
            f"orphans {r['orphans']} ({r['seconds']} s)"
        )
    print(summary(results))
    if args.json and results:
        write_json(args.json, args.runs, results)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
