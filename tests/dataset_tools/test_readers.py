"""Both input layouts, three file types, malformed rows, and a streamed multi-batch read."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataset_tools.readers import DialogueReader, InputError


def _write_parquet(path, rows, column="sample", type_=None):
    type_ = type_ or pa.list_(pa.string())
    pq.write_table(pa.table({column: pa.array(rows, type=type_)}), path)


def test_sample_layout_parquet_ignores_other_columns(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.table({"sample": [["Привет", "Пока"]], "source": ["x"]})
    pq.write_table(table, path)
    reader = DialogueReader(path)
    assert reader.layout.kind == "sample"
    assert [r.turns for r in reader.rows()] == [["Привет", "Пока"]]


def test_qa_layout_from_csv_and_jsonl_with_relevance(tmp_path):
    csv = tmp_path / "qa.csv"
    csv.write_text(
        "question,answer,relevance\nКак дела?,Хорошо,1\nЧто?,Ничего,0\n", encoding="utf-8"
    )
    rows = list(DialogueReader(csv).rows())
    assert [r.turns for r in rows] == [["Как дела?", "Хорошо"], ["Что?", "Ничего"]]
    assert [r.relevance for r in rows] == [1.0, 0.0]

    jsonl = tmp_path / "qa.jsonl"
    lines = [{"question": "Привет", "answer": "Здравствуй"}, {"question": None, "answer": "x"}]
    jsonl.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    rows = list(DialogueReader(jsonl).rows())
    assert rows[0].turns == ["Привет", "Здравствуй"]
    assert rows[1].malformed == "malformed_null"


def test_sample_layout_in_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        '{"sample": ["А", "Б"]}\nnot json\n{"sample": "строка"}\n{"sample": ["А", 5]}\n',
        encoding="utf-8",
    )
    rows = list(DialogueReader(jsonl).rows())
    assert rows[0].turns == ["А", "Б"]
    assert [r.malformed for r in rows[1:]] == [
        "malformed_null",
        "malformed_not_list",
        "malformed_non_string_turn",
    ]
    csv = tmp_path / "d.csv"
    csv.write_text('sample\n"[""Привет"", ""Пока""]"\n', encoding="utf-8")
    assert [r.turns for r in DialogueReader(csv).rows()] == [["Привет", "Пока"]]


def test_malformed_parquet_rows_are_reported_not_raised(tmp_path):
    path = tmp_path / "d.parquet"
    _write_parquet(path, [["А", "Б"], None, ["А", None], []])
    rows = list(DialogueReader(path).rows())
    assert [r.malformed for r in rows] == [
        None,
        "malformed_null",
        "malformed_non_string_turn",
        None,
    ]

    not_list = tmp_path / "s.parquet"
    _write_parquet(not_list, ["просто строка"], type_=pa.string())
    assert [r.malformed for r in DialogueReader(not_list).rows()] == ["malformed_not_list"]


def test_multi_batch_file_is_streamed_in_order(tmp_path, monkeypatch):
    path = tmp_path / "big.parquet"
    rows = [[f"вопрос {i}", f"ответ {i}"] for i in range(1000)]
    pq.write_table(pa.table({"sample": rows}), path, row_group_size=250)
    batches = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    reader = DialogueReader(path, batch_size=64)
    assert [r.turns for r in reader.rows()] == rows
    assert len(batches) >= 16 and max(batches) <= 64
    assert reader.total_rows == 1000


def test_missing_file_and_unknown_layout_give_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        DialogueReader(tmp_path / "nope.parquet")
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"text": ["a"], "label": [1]}), path)
    with pytest.raises(InputError) as error:
        DialogueReader(path)
    assert "other.parquet" in str(error.value) and "found: text, label" in str(error.value)
    garbage = tmp_path / "bad.parquet"
    garbage.write_bytes(b"not a parquet file")
    with pytest.raises(InputError, match=r"bad\.parquet"):
        DialogueReader(garbage)
