"""`prepare`: read a dialogue file, clean it, drop duplicates, split it, write parquet + stats.

One pass over the input, one batch in memory at a time. The only state that grows with the input
is the duplicate filter: two sets of 64-bit hashes (about 100 bytes per kept dialogue in CPython),
which is what makes deduplication possible without a second pass.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dataset_tools.cleaning import EDIT_RULES, CleaningConfig, clean_dialogue, normalised_key
from dataset_tools.readers import DialogueReader
from dataset_tools.splitting import SPLIT_NAMES, SplitRatios, dialogue_digest

logger = logging.getLogger(__name__)

TURNS_SCHEMA = pa.schema([pa.field("turns", pa.list_(pa.string()))])


@dataclass(frozen=True)
class PrepareConfig:
    """Everything `prepare` can be told; written into stats.json so a run can be reproduced."""

    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    split: SplitRatios = field(default_factory=lambda: SplitRatios(90, 5, 5))
    min_relevance: float = 1.0
    batch_size: int = 10_000
    show_progress: bool = True


class _Range:
    """Running mean/min/max, so stats need no list of every dialogue."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.low: int | None = None
        self.high: int | None = None

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)

    def as_dict(self) -> dict[str, float | int | None]:
        mean = round(self.total / self.count, 2) if self.count else None
        return {"mean": mean, "min": self.low, "max": self.high}


class _SplitWriter:
    """Buffers rows per split and writes them in row groups to a temporary file.

    The files appear under their final names only when everything succeeded, so a crash or
    Ctrl-C never leaves a half-written split that a later `make finetune` would take as whole.
    """

    def __init__(self, output_dir: Path, flush_rows: int) -> None:
        self.output_dir = output_dir
        self.flush_rows = flush_rows
        self.buffers: dict[str, list[list[str]]] = {name: [] for name in SPLIT_NAMES}
        self.writers = {
            name: pq.ParquetWriter(self._tmp(name), TURNS_SCHEMA, compression="zstd")
            for name in SPLIT_NAMES
        }
        self.counts: Counter[str] = Counter()

    def _tmp(self, name: str) -> Path:
        return self.output_dir / f".{name}.parquet.tmp"

    def add(self, split: str, turns: list[str]) -> None:
        self.buffers[split].append(turns)
        self.counts[split] += 1
        if len(self.buffers[split]) >= self.flush_rows:
            self._flush(split)

    def _flush(self, split: str) -> None:
        if self.buffers[split]:
            table = pa.table({"turns": self.buffers[split]}, schema=TURNS_SCHEMA)
            self.writers[split].write_table(table)
            self.buffers[split] = []

    def commit(self) -> None:
        for name in SPLIT_NAMES:
            self._flush(name)
            self.writers[name].close()
            os.replace(self._tmp(name), self.output_dir / f"{name}.parquet")

    def abort(self) -> None:
        for name in SPLIT_NAMES:
            self.writers[name].close()
            self._tmp(name).unlink(missing_ok=True)


def prepare(input_path: Path, output_dir: Path, config: PrepareConfig) -> dict[str, Any]:
    """Run the whole pipeline and return the stats that were written to ``stats.json``."""
    reader = DialogueReader(input_path, batch_size=config.batch_size)
    output_dir.mkdir(parents=True, exist_ok=True)

    malformed: Counter[str] = Counter()
    edits: Counter[str] = Counter({rule: 0 for rule in EDIT_RULES})
    cut: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    turns_range, chars_range = _Range(), _Range()
    seen_exact: set[int] = set()
    seen_normalised: set[int] = set()
    rows_read = 0
    started = time.perf_counter()

    writer = _SplitWriter(output_dir, flush_rows=config.batch_size)
    try:
        progress = tqdm(
            reader.rows(),
            total=reader.total_rows,
            unit=" rows",
            desc=f"prepare {input_path.name}",
            disable=not config.show_progress,
            mininterval=0.5,
        )
        for row in progress:
            rows_read += 1
            if row.turns is None:
                malformed[row.malformed or "malformed"] += 1
                continue
            if row.relevance is not None and row.relevance < config.min_relevance:
                dropped["below_relevance"] += 1
                continue
            cleaned = clean_dialogue(row.turns, config.cleaning, edits)
            if not cleaned.kept:
                dropped[cleaned.rejected_by or "too_few_turns"] += 1
                continue
            if cleaned.rejected_by:
                cut[cleaned.rejected_by] += 1
            exact = dialogue_digest("\x1f".join(cleaned.turns))
            if exact in seen_exact:
                dropped["duplicate_exact"] += 1
                continue
            seen_exact.add(exact)
            normalised = dialogue_digest(normalised_key(cleaned.turns))
            if normalised in seen_normalised:
                dropped["duplicate_normalised"] += 1
                continue
            seen_normalised.add(normalised)
            turns_range.add(len(cleaned.turns))
            chars_range.add(sum(len(t) for t in cleaned.turns))
            writer.add(config.split.assign(normalised), cleaned.turns)
        progress.close()
        writer.commit()
    except BaseException:
        writer.abort()
        raise

    elapsed = time.perf_counter() - started
    stats: dict[str, Any] = {
        "input": str(input_path),
        "layout": reader.layout.kind,
        "rows_read": rows_read,
        "rows_malformed": dict(sorted(malformed.items())),
        "dialogues_kept": sum(writer.counts.values()),
        "dialogues_dropped": dict(sorted(dropped.items())),
        "dialogues_cut": dict(sorted(cut.items())),
        "turn_edits": dict(edits),
        "turns_per_dialogue": turns_range.as_dict(),
        "chars_per_dialogue": chars_range.as_dict(),
        "splits": {name: writer.counts[name] for name in SPLIT_NAMES},
        "config": {
            **asdict(config.cleaning),
            "split": str(config.split),
            "min_relevance": config.min_relevance if reader.layout.has_relevance else None,
        },
    }
    # stats.json holds no timings, so two runs on the same input give identical files.
    (output_dir / "stats.json").write_text(
        json.dumps(stats, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    stats["elapsed_s"] = elapsed
    logger.info("prepared %d rows in %.1f s", rows_read, elapsed)
    return stats


def format_summary(stats: dict[str, Any]) -> str:
    """The table printed at the end of a run: what came in, what went where, and why."""
    lines: list[tuple[str, str]] = [
        ("input", f"{stats['input']} ({stats['layout']} layout)"),
        ("rows read", f"{stats['rows_read']:,}"),
    ]
    lines += [(f"  malformed: {k}", f"{v:,}") for k, v in stats["rows_malformed"].items()]
    lines += [(f"  dropped: {k}", f"{v:,}") for k, v in stats["dialogues_dropped"].items()]
    lines += [(f"  cut (prefix kept): {k}", f"{v:,}") for k, v in stats["dialogues_cut"].items()]
    lines += [(f"  turns edited: {k}", f"{v:,}") for k, v in stats["turn_edits"].items() if v]
    lines.append(("dialogues kept", f"{stats['dialogues_kept']:,}"))
    turns, chars = stats["turns_per_dialogue"], stats["chars_per_dialogue"]
    if turns["mean"] is not None:
        lines.append(("turns / dialogue", f"mean {turns['mean']}, {turns['min']}–{turns['max']}"))
        lines.append(("chars / dialogue", f"mean {chars['mean']}, {chars['min']}–{chars['max']}"))
    lines += [(f"split {k}", f"{v:,}") for k, v in stats["splits"].items()]
    if "elapsed_s" in stats:
        rate = stats["rows_read"] / stats["elapsed_s"] if stats["elapsed_s"] else 0.0
        lines.append(("time", f"{stats['elapsed_s']:.1f} s ({rate:,.0f} rows/s)"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines)
