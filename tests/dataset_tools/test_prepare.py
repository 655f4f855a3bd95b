"""`python -m dataset_tools prepare` end to end, as an operator runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataset_tools.prepare import PrepareConfig, prepare
from dataset_tools.sample_data import DEFAULT_SAMPLE_PATH, generate_dialogues, write_sample
from dataset_tools.splitting import SplitRatios

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / DEFAULT_SAMPLE_PATH


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dataset_tools", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _turns(path: Path) -> list[list[str]]:
    return pq.read_table(path).column("turns").to_pylist()


def test_cli_writes_splits_and_stats_and_is_byte_identical_twice(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        result = _run("prepare", "--input", str(SAMPLE), "--output-dir", str(out), "--no-progress")
        assert result.returncode == 0, result.stderr
        assert "dialogues kept" in result.stdout
    for name in ("train.parquet", "val.parquet", "test.parquet", "stats.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    stats = json.loads((first / "stats.json").read_text(encoding="utf-8"))
    sizes = {name: len(_turns(first / f"{name}.parquet")) for name in ("train", "val", "test")}
    assert stats["splits"] == sizes
    assert stats["dialogues_kept"] == sum(sizes.values()) >= 300
    # every rule fires on the sample's dirty rows
    assert all(count > 0 for count in stats["turn_edits"].values()), stats["turn_edits"]
    for rule in ("duplicate_exact", "duplicate_normalised", "too_few_turns", "empty_turn"):
        assert stats["dialogues_dropped"].get(rule), rule
    assert stats["dialogues_cut"].get("too_long") and stats["dialogues_cut"].get("empty_turn")
    assert stats["rows_malformed"] == {"malformed_non_string_turn": 1, "malformed_null": 1}


def test_split_is_disjoint_deterministic_and_configurable(tmp_path):
    prepare(
        SAMPLE, tmp_path, PrepareConfig(split=SplitRatios.parse("70/30/0"), show_progress=False)
    )
    train, val, test = (_turns(tmp_path / f"{n}.parquet") for n in ("train", "val", "test"))
    assert test == []
    assert not {tuple(t) for t in train} & {tuple(t) for t in val}
    assert 0.55 < len(train) / (len(train) + len(val)) < 0.85
    # a dialogue's split does not depend on what else is in the file
    alone = tmp_path / "alone"
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"sample": [val[0]]}), one)
    prepare(one, alone, PrepareConfig(split=SplitRatios.parse("70/30/0"), show_progress=False))
    assert _turns(alone / "val.parquet") == [val[0]]


@pytest.mark.parametrize("bad", ["90/5", "50/50/50", "a/b/c", "0/50/50", "-10/60/50"])
def test_bad_split_is_refused(bad):
    with pytest.raises(ValueError):
        SplitRatios.parse(bad)


def test_relevance_below_threshold_is_dropped_and_counted(tmp_path):
    path = tmp_path / "qa.parquet"
    pq.write_table(
        pa.table(
            {
                "question": ["Как дела?", "Что нового?", "Где ты?"],
                "answer": ["Хорошо, спасибо.", "Картошка.", "Дома."],
                "relevance": [1, 0, 1],
            }
        ),
        path,
    )
    stats = prepare(path, tmp_path / "out", PrepareConfig(show_progress=False))
    assert stats["layout"] == "qa"
    assert stats["dialogues_dropped"] == {"below_relevance": 1}
    assert stats["dialogues_kept"] == 2


def test_bad_input_exits_non_zero_with_one_line(tmp_path):
    missing = _run("prepare", "--input", str(tmp_path / "x.parquet"), "--output-dir", str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "x.parquet" in missing.stderr
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"text": ["a"]}), wrong)
    result = _run("prepare", "--input", str(wrong), "--output-dir", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "found: text" in result.stderr and "Traceback" not in result.stderr


def test_sample_file_is_reproducible_and_varied(tmp_path):
    path = tmp_path / "sample.parquet"
    write_sample(path)
    assert path.read_bytes() == SAMPLE.read_bytes()
    dialogues = generate_dialogues()
    assert len(dialogues) >= 300
    assert {len(d) for d in dialogues} == {2, 3, 4, 5, 6}
    assert len({d[0] for d in dialogues}) >= 60  # many different openings, not one template


def test_a_failed_run_leaves_no_half_written_split(tmp_path, monkeypatch):
    import dataset_tools.prepare as module

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(module, "clean_dialogue", explode)
    with pytest.raises(RuntimeError):
        prepare(SAMPLE, tmp_path, PrepareConfig(show_progress=False))
    assert list(tmp_path.iterdir()) == []
