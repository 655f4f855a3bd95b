"""Streaming readers for dialogue files: parquet, CSV and JSONL, in either layout.

Layouts (both seen in the customer's data):

* ``sample``: one dialogue per row as a list of utterances (``Den4ikAI/russian_dialogues_2``);
* ``question`` / ``answer``: one two-turn dialogue per row, optionally with ``relevance``
  (``Den4ikAI/russian_dialogues``, whose ``relevance == 0`` rows are shuffled negatives).

The real files hold millions of rows, so nothing here loads a whole file: parquet and CSV are read
in record batches with pyarrow, JSONL line by line. A malformed row is reported, not raised, so one
bad row never ends a long run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

SUPPORTED_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")


class InputError(Exception):
    """The input cannot be read at all; the message is one line meant for the operator."""


@dataclass(frozen=True)
class Row:
    """One input row: its turns, or why it is malformed; and its relevance label if it has one."""

    turns: list[str] | None
    malformed: str | None = None
    relevance: float | None = None


@dataclass(frozen=True)
class Layout:
    """Which columns hold the dialogue; ``kind`` is ``sample`` or ``qa``."""

    kind: str
    has_relevance: bool

    @property
    def columns(self) -> list[str]:
        cols = ["sample"] if self.kind == "sample" else ["question", "answer"]
        return [*cols, "relevance"] if self.has_relevance else cols


def detect_layout(path: Path, columns: list[str]) -> Layout:
    """Pick the layout from column names, or fail naming the file and the columns it has."""
    has_relevance = "relevance" in columns
    if "sample" in columns:
        return Layout("sample", has_relevance)
    if "question" in columns and "answer" in columns:
        return Layout("qa", has_relevance)
    found = ", ".join(columns) if columns else "none"
    raise InputError(
        f"{path}: no 'sample' column and no 'question'/'answer' columns (found: {found})"
    )


def _parse_sample(value: Any) -> Row:
    if value is None:
        return Row(None, "malformed_null")
    if isinstance(value, str):  # CSV cells hold a list as JSON text
        try:
            value = json.loads(value)
        except ValueError:
            return Row(None, "malformed_not_list")
    if not isinstance(value, list):
        return Row(None, "malformed_not_list")
    if not all(isinstance(turn, str) for turn in value):
        return Row(None, "malformed_non_string_turn")
    return Row(value)


def _parse_qa(question: Any, answer: Any) -> Row:
    if question is None or answer is None:
        return Row(None, "malformed_null")
    if not isinstance(question, str) or not isinstance(answer, str):
        return Row(None, "malformed_non_string_turn")
    return Row([question, answer])


def _relevance(value: Any) -> tuple[float | None, bool]:
    """(relevance, ok): a label that is not a number makes the row malformed."""
    if value is None:
        return None, True
    try:
        return float(value), True
    except (TypeError, ValueError):
        return None, False


def _rows_from_records(records: Iterator[dict[str, Any]], layout: Layout) -> Iterator[Row]:
    for record in records:
        if layout.kind == "sample":
            row = _parse_sample(record.get("sample"))
        else:
            row = _parse_qa(record.get("question"), record.get("answer"))
        if layout.has_relevance and row.turns is not None:
            relevance, ok = _relevance(record.get("relevance"))
            row = Row(row.turns, relevance=relevance) if ok else Row(None, "malformed_relevance")
        yield row


def _batch_records(batch: pa.RecordBatch) -> Iterator[dict[str, Any]]:
    columns = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
    names = list(columns)
    for values in zip(*columns.values(), strict=True):
        yield dict(zip(names, values, strict=True))


class DialogueReader:
    """Opens a dialogue file, checks its layout up front, and streams its rows."""

    def __init__(self, path: Path, batch_size: int = 10_000) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.path = Path(path)
        self.batch_size = batch_size
        if not self.path.is_file():
            raise InputError(f"{self.path}: input file not found")
        self.format = self.path.suffix.lower()
        if self.format not in SUPPORTED_SUFFIXES:
            raise InputError(
                f"{self.path}: unsupported file type '{self.format}' "
                f"(expected one of {', '.join(SUPPORTED_SUFFIXES)})"
            )
        self.layout = detect_layout(self.path, self._column_names())

    @property
    def total_rows(self) -> int | None:
        """Row count when the file's metadata knows it (parquet), for the progress bar."""
        if self.format == ".parquet":
            return pq.ParquetFile(self.path).metadata.num_rows
        return None

    def _column_names(self) -> list[str]:
        try:
            if self.format == ".parquet":
                return list(pq.ParquetFile(self.path).schema_arrow.names)
            if self.format == ".csv":
                with pa_csv.open_csv(self.path) as reader:
                    return list(reader.schema.names)
            with self.path.open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        first = json.loads(line)
                        return list(first) if isinstance(first, dict) else []
                return []
        except (pa.ArrowInvalid, OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise InputError(
                f"{self.path}: cannot read as {self.format[1:]}: {first_line}"
            ) from None

    def rows(self) -> Iterator[Row]:
        """Every row in file order; memory holds one batch at a time."""
        if self.format == ".parquet":
            parquet = pq.ParquetFile(self.path)
            for batch in parquet.iter_batches(
                batch_size=self.batch_size, columns=self.layout.columns
            ):
                yield from _rows_from_records(_batch_records(batch), self.layout)
        elif self.format == ".csv":
            options = pa_csv.ReadOptions(block_size=1 << 22)
            convert = pa_csv.ConvertOptions(
                include_columns=self.layout.columns,
                column_types={c: pa.string() for c in self.layout.columns if c != "relevance"},
            )
            with pa_csv.open_csv(self.path, read_options=options, convert_options=convert) as csv:
                for batch in csv:
                    yield from _rows_from_records(_batch_records(batch), self.layout)
        else:
            yield from _rows_from_records(self._json_records(), self.layout)

    def _json_records(self) -> Iterator[dict[str, Any]]:
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                # A line that is not a JSON object is a malformed row: make it look like one.
                yield record if isinstance(record, dict) else {}
