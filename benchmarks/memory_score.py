"""Score ``python -m bot.memory_eval``'s prompts against the set they came from: is the answer
in the prompt (before the question itself)?

Per category and distance: ``hit`` (an answer is there), ``wrong_only`` (for ``update`` and
``other``: the superseded value, or the other person's, is there and the answer is not);
``never``: the memory tokens a question about something never said got; ``ordinary``: how
often an ordinary next message recalled something, and the memory tokens it got. Also the prompt
building and storing times (p50, p95). ``--json`` writes a result for ``benchmarks/results/``
with the machine it ran on (``make bench-report`` renders it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2) if ordered else 0.0


def _unasked(tokens: list[int]) -> dict[str, Any]:
    """What memory added to messages that ask nothing it should bring back."""
    return {
        "n": len(tokens),
        "with_memory": sum(1 for count in tokens if count > 0),
        "memory_tokens_mean": round(statistics.fmean(tokens), 1) if tokens else 0,
    }


def score(items: list[dict[str, Any]], results: list[dict[str, Any]]) -> dict[str, Any]:
    by_id = {r["id"]: r for r in results}
    cells: dict[str, dict[str, Any]] = {}
    unasked: dict[str, list[int]] = {}  # memory tokens of the probes that ask nothing back
    for item in items:
        result = by_id.get(item["id"])
        if result is None:
            raise SystemExit(f"no result for {item['id']}: run memory_eval on this very set")
        before = result["prompt"].rsplit(item["probe"], 1)[0].lower()
        if item["category"] in ("never", "ordinary"):
            unasked.setdefault(item["category"], []).append(result["memory_tokens"])
            continue
        hit = any(answer.lower() in before for answer in item["answers"])
        wrong = any(value.lower() in before for value in item["wrong"])
        cell = cells.setdefault(
            f"{item['category']}@{item['distance']}",
            {"category": item["category"], "distance": item["distance"], "n": 0, "hit": 0},
        )
        cell["n"] += 1
        cell["hit"] += hit
        if item["wrong"]:
            cell["wrong_only"] = cell.get("wrong_only", 0) + (wrong and not hit)
    latency = [r["latency_ms"] for r in results]
    store = [r["store_ms"] for r in results if "store_ms" in r]
    return {
        "cells": sorted(cells.values(), key=lambda c: (c["category"], c["distance"])),
        **{category: _unasked(unasked.get(category, [])) for category in ("never", "ordinary")},
        "prompt_ms_p50": _quantile(latency, 0.5),
        "prompt_ms_p95": _quantile(latency, 0.95),
        "store_ms_p95": _quantile(store, 0.95),
        "prompt_tokens_mean": round(statistics.fmean(r["prompt_tokens"] for r in results), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_score", description=__doc__)
    parser.add_argument("--set", type=Path, required=True, help="benchmarks.memory_set's JSONL")
    parser.add_argument("--results", type=Path, required=True, help="memory_eval's JSONL")
    parser.add_argument("--memory", choices=["on", "off"], required=True, help="as evaluated")
    parser.add_argument(
        "--database", default="sqlite", help="the backend it ran on, for the record"
    )
    parser.add_argument("--json", type=Path, help="also write a result for benchmarks/results/")
    args = parser.parse_args(argv)
    figures = score(_lines(args.set), _lines(args.results))
    for cell in figures["cells"]:
        line = f"{cell['category']:7} {cell['distance']:>5} turns back: {cell['hit']}/{cell['n']} "
        line += f"answer in the prompt ({cell['hit'] / cell['n']:.0%})"
        if "wrong_only" in cell:
            line += f", wrong value alone {cell['wrong_only']}/{cell['n']}"
        print(line)
    never = figures["never"]
    print(f"never said: {never['n']} questions, {never['memory_tokens_mean']} memory tokens mean")
    ordinary = figures["ordinary"]
    if ordinary["n"]:
        print(
            f"ordinary messages: {ordinary['with_memory']}/{ordinary['n']} recalled something, "
            f"{ordinary['memory_tokens_mean']} memory tokens mean"
        )
    print(
        f"prompt building p50 {figures['prompt_ms_p50']} ms, p95 {figures['prompt_ms_p95']} ms; "
        f"storing a message p95 {figures['store_ms_p95']} ms"
    )
    if args.json:
        from benchmarks.machine import describe_machine

        document = {
            "benchmark": "memory",
            "machine": describe_machine(),
            "settings": {
                "memory": args.memory,
                "database": args.database,
                "dialogues": len(_lines(args.set)),
            },
            "figures": figures,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
