"""Render the benchmark tables from the stored results: ``make bench-report``.

``benchmarks/results/*.json`` are runs worth keeping, each written by a benchmark's ``--json``
with the machine it ran on (:mod:`benchmarks.machine`). From them this writes
``docs/benchmarks.md`` (every run, grouped by machine) and the headline table between the
markers in ``README.md`` (the newest serving and training run). Nobody types a figure: a test
checks that the committed tables are exactly what this renders from the committed results.

``--check`` writes nothing and fails when a committed table differs from what it would write.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_label

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
HEADLINE_START = "<!-- bench-report:start (make bench-report writes this table) -->"
HEADLINE_END = "<!-- bench-report:end -->"

INTRO = """# Benchmarks

Every table here is rendered by `make bench-report` from the stored runs in
[`benchmarks/results/`](../benchmarks/results/); do not edit it by hand. A run records the
machine it ran on (CPU model and the flags that decide which kernels run, cores, memory,
accelerator, library versions, the commit, the date), so figures from different machines are
never mixed in one table. Timings on shared machines are noisy: compare the ratios inside one
run (each design against the first one run, on the same model and workload), not absolute
figures across runs.

To add a run:

```bash
make bench SHAPE=medium ARGS="--designs naive,engine,engine:bfloat16,engine:int8 \\
    --json benchmarks/results/serving-medium-$(date +%Y%m%d).json"
make bench-train TRAIN_SHAPE=small \\
    ARGS="--json benchmarks/results/training-small-$(date +%Y%m%d).json"
make bench-memory MEMORY=on ARGS="--json benchmarks/results/memory-on-$(date +%Y%m%d).json"
make test-chaos JSON=benchmarks/results/chaos-$(date +%Y%m%d).json
make bench-report
```

What the benchmarks measure is described in [serving.md](serving.md#benchmarks),
[training.md](training.md#throughput) and [bot.md](bot.md#measuring-memory).
"""


def load_results(folder: Path = RESULTS) -> list[dict[str, Any]]:
    """Every stored run, oldest first (by the date it ran), each with its file name."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text(encoding="utf-8"))
        if "machine" not in run or "benchmark" not in run:
            raise ValueError(f"{path}: not a benchmark result (no 'benchmark' or 'machine')")
        run["file"] = path.name
        runs.append(run)
    return sorted(runs, key=lambda run: (run["machine"]["date"], run["file"]))


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def _serving_settings(run: dict[str, Any]) -> str:
    s = run["settings"]
    text = f"{s['shape']} shape, {s['users']} users × {s['turns']} turns"
    if s.get("history"):
        text += f" after {s['history']} earlier exchanges (cached when the clock starts)"
    text += f", {s['reply_tokens']}-token replies"
    if s.get("background_load"):
        text += f", {s['background_load']} busy process(es) beside it"
    if s.get("recall_every"):
        text += f", memory recalls an exchange every {s['recall_every']} turns"
    if s.get("repeat"):
        text += f", each design run {s['repeat']} times in turn (the median run shown)"
    return text


def serving_table(run: dict[str, Any]) -> list[str]:
    """One row per design: throughput and its ratio to the first design, latency, memory."""
    designs = run["designs"]
    base = next(iter(designs.values()))["tokens_per_s"]
    rows = []
    for name, d in designs.items():
        step = d.get("decode_step_p50_ms")
        rows.append(
            [
                f"`{name}`",
                _num(d["tokens_per_s"]),
                f"{d['tokens_per_s'] / base:.2f}×" if base else "–",
                _num(d["p50_s"]),
                _num(d["p95_s"]),
                _num(d["first_token_p50_s"]),
                _num(d["peak_rss_mb"], 0),
                f"{_num(step, 1)} ({d['decode_rows']} rows)" if step is not None else "–",
            ]
        )
    header = [
        "design",
        "new tokens/s",
        "× first",
        "turn p50, s",
        "turn p95, s",
        "first token p50, s",
        "peak RSS, MB",
        "decoding step p50, ms",
    ]
    table = _table(header, rows)
    runs = [
        f"`{name}` {', '.join(_num(x) for x in d['tokens_per_s_runs'])}"
        + (
            f" (decoding step p50 {', '.join(_num(x, 1) for x in d['decode_step_p50_ms_runs'])} ms)"
            if "decode_step_p50_ms_runs" in d
            else ""
        )
        for name, d in designs.items()
        if "tokens_per_s_runs" in d
    ]
    if runs:  # how far apart a design's own runs were: the noise a ratio stands against
        table += ["", f"New tokens/s of each run, in the order run: {'; '.join(runs)}."]
    return table


def training_table(run: dict[str, Any]) -> list[str]:
    r = run["result"]
    rows = [
        [
            key,
            r[key]["recipe"],
            f"{r[key]['real_tokens']:,}",
            _num(r[key]["seconds"], 1),
            _num(r[key]["tokens_per_s"], 1),
        ]
        for key in ("naive", "packed")
    ]
    rows.append(["packed / naive", "", "", "", f"{r['ratio']:.2f}×"])
    return _table(["recipe", "how", "real tokens", "seconds", "real tokens/s"], rows)


def memory_table(run: dict[str, Any]) -> list[str]:
    """Per category, the share of questions whose answer is in the prompt at each distance
    (and, where there is one, how often only the wrong value is), then the costs."""
    f = run["figures"]
    distances = sorted({c["distance"] for c in f["cells"]})
    rows = []
    for category in sorted({c["category"] for c in f["cells"]}):
        cells = {c["distance"]: c for c in f["cells"] if c["category"] == category}
        row = [category]
        for distance in distances:
            c = cells.get(distance)
            if c is None:
                row.append("–")
                continue
            text = f"{c['hit'] / c['n']:.0%} of {c['n']}"
            if "wrong_only" in c:
                text += f" (wrong alone {c['wrong_only'] / c['n']:.0%})"
            row.append(text)
        rows.append(row)
    lines = _table(["answer in the prompt", *(f"{d} turns back" for d in distances)], rows)
    never = f["never"]
    lines += [
        "",
        f"Questions about things never said: {never['n']}, memory tokens added "
        f"{never['memory_tokens_mean']} on average. Building a prompt: p50 "
        f"{f['prompt_ms_p50']} ms, p95 {f['prompt_ms_p95']} ms; storing a message with its "
        f"index: p95 {f['store_ms_p95']} ms.",
    ]
    ordinary = f.get("ordinary") or {}
    if ordinary.get("n"):
        lines[-1] += (
            f" Ordinary next messages after 1,000 turns: {ordinary['with_memory']} of "
            f"{ordinary['n']} recalled something, {ordinary['memory_tokens_mean']} memory tokens "
            "on average."
        )
    return lines


def memory_latency_table(run: dict[str, Any]) -> list[str]:
    """What memory costs a message at scale: storing it with its index, and building its
    prompt with memory and without (the difference is what retrieval and assembly add)."""
    f = run["figures"]
    rows = [
        ["storing a message with its index", _num(f["store_ms_p50"]), _num(f["store_ms_p95"])],
        [
            "the same, stored the straightforward way",
            _num(f.get("store_naive_ms_p50")),
            _num(f.get("store_naive_ms_p95")),
        ],
        [
            "storing a message, memory off",
            _num(f.get("store_without_memory_ms_p50")),
            _num(f.get("store_without_memory_ms_p95")),
        ],
        ["building the prompt, memory on", _num(f["prompt_ms_p50"]), _num(f["prompt_ms_p95"])],
        ["building the prompt, memory off", "–", _num(f["prompt_without_memory_ms_p95"])],
        [
            "added by memory (on − off, per message)",
            _num(f["memory_added_ms_p50"]),
            _num(f["memory_added_ms_p95"]),
        ],
    ]
    return _table(["per message", "p50, ms", "p95, ms"], rows)


def memory_logprob_table(run: dict[str, Any]) -> list[str]:
    """How likely a trained model finds the right reply after the prompt with memory and
    after the one without."""
    f = run["figures"]
    rows = [
        ["with memory", _num(f["logprob_with_memory"], 3)],
        ["without memory", _num(f["logprob_without_memory"], 3)],
    ]
    lines = _table(["prompt", "mean log-probability per token of the right reply"], rows)
    lines += [
        "",
        f"Higher with memory for {f['higher_with_memory']} of {f['answers']} answers.",
    ]
    return lines


def chaos_table(run: dict[str, Any]) -> list[str]:
    """Per fault: its runs, and what the users' chats showed against what was stored."""
    rows = [
        [
            f"`{fault}`",
            str(f["runs"]),
            str(f["messages"]),
            str(f["lost"]),
            str(f["shown_twice"]),
            str(f["out_of_order"]),
            str(f["orphans"]),
            f"{f['runs_with_orphans']} of {f['runs']}",
        ]
        for fault, f in run["faults"].items()
    ]
    header = ["fault", "runs", "messages", "lost", "shown twice", "out of order", "orphans"]
    return _table([*header, "runs with an orphan"], rows)


def _run_heading(run: dict[str, Any]) -> str:
    m = run["machine"]
    when = m["date"][:10]
    commit = f", commit `{m['commit']}`" if m.get("commit") else ""
    if run["benchmark"] == "serving":
        what = f"Serving: {_serving_settings(run)}"
    elif run["benchmark"] == "memory":
        s = run["settings"]
        what = f"Memory: {s['dialogues']} dialogues, memory {s['memory']}, {s['database']}"
    elif run["benchmark"] == "memory_logprob":
        s, f = run["settings"], run["figures"]
        what = f"Memory and the model: {f['answers']} answers, model `{s['model']}`"
    elif run["benchmark"] == "chaos":
        s = run["settings"]
        what = (
            f"Faults mid-conversation (`make test-chaos`): {s['runs']} runs a fault, "
            f"{s['users']} users × {s['messages']} messages"
        )
    elif run["benchmark"] == "memory_latency":
        s, f = run["settings"], run["figures"]
        what = (
            f"Memory latency: {f['messages_per_user']:,} messages for the user, "
            f"{f['messages_in_database']:,} in the database, {s['database']}"
            + (f" (synchronous {s['sqlite_synchronous']})" if "sqlite_synchronous" in s else "")
            + (
                f" (fsync {s['postgresql_fsync']}, synchronous_commit "
                f"{s['postgresql_synchronous_commit']}: a test server)"
                if s.get("postgresql_fsync") == "off"
                else ""
            )
            + f", {f['probes']} messages timed"
        )
    else:
        s = run["settings"]
        what = f"Training: {s['shape']} shape, {run['result']['dialogues']:,} dialogues"
    return f"### {what} ({when}{commit}; `{run['file']}`)"


TABLES = {
    "chaos": chaos_table,
    "serving": serving_table,
    "memory": memory_table,
    "memory_latency": memory_latency_table,
    "memory_logprob": memory_logprob_table,
    "training": training_table,
}


def render_doc(runs: list[dict[str, Any]]) -> str:
    """``docs/benchmarks.md``: each machine, then each of its runs, newest first."""
    lines = [INTRO.rstrip(), ""]
    machines: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        machines.setdefault(machine_label(run["machine"]), []).append(run)
    for label, of_machine in machines.items():
        m = of_machine[-1]["machine"]
        lines += [
            f"## {label}",
            "",
            f"Flags: {', '.join(m['cpu_flags']) or 'none of those that matter'}; memory "
            f"{_num(m['memory_gib'], 1)} GiB; torch {m['torch']}, transformers "
            f"{m['transformers']}, Python {m['python']}.",
            "",
        ]
        for run in reversed(of_machine):
            lines += [_run_heading(run), ""]
            lines += TABLES[run["benchmark"]](run)
            lines.append("")
    if not runs:
        lines += ["No stored runs yet.", ""]
    return "\n".join(lines)


def render_headline(runs: list[dict[str, Any]]) -> str:
    """The README's table: the newest serving run against the naive design, and the newest
    training run, if any."""
    lines = [HEADLINE_START]
    # The headline compares against the naive design: a run of engine variants alone (memory
    # placements, say) is in docs/benchmarks.md only.
    serving = [r for r in runs if r["benchmark"] == "serving" and "naive" in r["designs"]]
    training = [r for r in runs if r["benchmark"] == "training"]
    if serving:
        run = serving[-1]
        m = run["machine"]
        lines += [
            "",
            f"Serving, {_serving_settings(run)}, on {machine_label(m)} ({m['date'][:10]}):",
            "",
        ]
        designs = run["designs"]
        base = next(iter(designs.values()))["tokens_per_s"]
        rows = [
            [
                f"`{name}`",
                _num(d["tokens_per_s"]),
                f"{d['tokens_per_s'] / base:.2f}×" if base else "–",
                _num(d["p95_s"]),
                _num(d["peak_rss_mb"], 0),
            ]
            for name, d in designs.items()
        ]
        lines += _table(["design", "new tokens/s", "× first", "turn p95, s", "peak RSS, MB"], rows)
    if training:
        run = training[-1]
        r, m = run["result"], run["machine"]
        lines += [
            "",
            f"Training, {run['settings']['shape']} shape, on {machine_label(m)} "
            f"({m['date'][:10]}): packed sequences train {r['packed']['tokens_per_s']:.1f} real "
            f"tokens/s against {r['naive']['tokens_per_s']:.1f} for the naive recipe "
            f"(**{r['ratio']:.2f}×**).",
        ]
    lines += ["", HEADLINE_END]
    return "\n".join(lines)


def with_headline(readme: str, headline: str) -> str:
    """``readme`` with the text between the markers replaced by ``headline``."""
    start, end = readme.find(HEADLINE_START), readme.find(HEADLINE_END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {HEADLINE_START!r} ... {HEADLINE_END!r} block")
    return readme[:start] + headline + readme[end + len(HEADLINE_END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a table is out of date")
    args = parser.parse_args(argv)
    runs = load_results()
    doc = render_doc(runs)
    readme = with_headline(README.read_text(encoding="utf-8"), render_headline(runs))
    stale = [
        path.relative_to(ROOT)
        for path, text in ((DOC, doc), (README, readme))
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]
    if args.check:
        for path in stale:
            print(f"{path} is not what `make bench-report` renders from benchmarks/results/")
        return 1 if stale else 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(doc, encoding="utf-8")
    README.write_text(readme, encoding="utf-8")
    print(f"rendered {len(runs)} stored run(s) into {DOC.relative_to(ROOT)} and README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
