"""read_rows: good files of every kind, and every kind of bad file explained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.data import DataError, file_columns, read_rows


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(DataError) as info:
        read_rows(path)
    return str(info.value)


def test_json_array_rows_get_the_union_of_columns(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([{"a": "x", "b": "1"}, {"a": "y", "c": [1, 2]}]))
    assert read_rows(path) == [{"a": "x", "b": "1", "c": None}, {"a": "y", "b": None, "c": [1, 2]}]


def test_json_file_holding_json_lines_and_jsonl_with_blank_lines(tmp_path):
    lines = '{"a": "x"}\n\n{"a": "y"}\n\n'
    assert read_rows(write(tmp_path / "a.json", lines)) == [{"a": "x"}, {"a": "y"}]
    assert read_rows(write(tmp_path / "a.jsonl", lines)) == [{"a": "x"}, {"a": "y"}]


def test_json_keeps_value_types_for_validation(tmp_path):
    path = write(tmp_path / "m.jsonl", '{"o": "x"}\n{"o": 5}\n{"o": {"k": 1}}\n')
    assert [r["o"] for r in read_rows(path)] == ["x", 5, {"k": 1}]


def test_byte_order_mark_is_accepted(tmp_path):
    assert read_rows(write(tmp_path / "b.jsonl", '\ufeff{"a": "x"}\n')) == [{"a": "x"}]


def test_csv_cells_stay_text_as_written(tmp_path):
    path = write(tmp_path / "a.csv", 'instruction,input,output\nq1,,NA\nq2,"a, b",001\n')
    assert read_rows(path) == [
        {"instruction": "q1", "input": "", "output": "NA"},
        {"instruction": "q2", "input": "a, b", "output": "001"},
    ]


def test_parquet(tmp_path):
    import pandas as pd

    path = tmp_path / "a.parquet"
    pd.DataFrame({"text": ["one", "two"]}).to_parquet(path)
    assert read_rows(path) == [{"text": "one"}, {"text": "two"}]


def test_reading_leaves_no_cache_behind(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    read_rows(write(tmp_path / "a.jsonl", '{"a": "x"}\n'))
    assert not cache.exists()


def test_file_columns_first_seen_order():
    assert file_columns([{"b": 1, "a": 2}, {"c": 3, "a": 4}]) == ["b", "a", "c"]


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.json").startswith(f"File not found: {tmp_path / 'nope.json'}.")


def test_folder(tmp_path):
    (tmp_path / "d.json").mkdir()
    assert "is a folder, not a file" in error_of(tmp_path / "d.json")


def test_empty_file(tmp_path):
    assert error_of(write(tmp_path / "e.jsonl", "")) == (
        "'e.jsonl' is empty (0 bytes). Choose the file that holds your rows, or re-export it."
    )
    assert "holds only whitespace" in error_of(write(tmp_path / "w.json", " \n\n "))


def test_not_utf8_names_the_byte_offset(tmp_path):
    path = write(tmp_path / "l.jsonl", b'{"a": "ok"}\n{"a": "caf' + b"\xe9" + b'"}\n')
    assert error_of(path).startswith(
        "'l.jsonl' is not UTF-8 text: byte 0xE9 at byte offset 22 (line 2) cannot be decoded."
    )


def test_binary_content_with_text_extension(tmp_path):
    assert "binary data (NUL bytes)" in error_of(write(tmp_path / "x.csv", b"a,b\n\x00\x01\x02\n"))
    assert "looks like a Parquet file: rename it to .parquet" in error_of(
        write(tmp_path / "p.json", b"PAR1\x00\x00junkPAR1")
    )
    assert "ZIP archive" in error_of(write(tmp_path / "z.csv", b"PK\x03\x04rest"))


def test_truncated_json_gives_line_and_column(tmp_path):
    path = write(tmp_path / "t.json", '[\n  {"a": "x"},\n  {"a": ')
    assert error_of(path).startswith("'t.json' is not valid JSON: Expecting value at line 3, column 9.")


def test_jsonl_with_one_bad_line_names_it(tmp_path):
    path = write(tmp_path / "b.jsonl", '{"a": "x"}\n\n{"a": \n{"a": "z"}\n')
    assert error_of(path).startswith("Line 3 of 'b.jsonl' is not valid JSON (Expecting value at column 7).")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "b.jsonl", '{"a": "x"}\n["a"]\n')
    assert error_of(path).startswith("Line 2 of 'b.jsonl' is a list, not an object.")


def test_json_array_element_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "s.json", '[{"a": "x"}, "oops"]')
    assert error_of(path).startswith("Row 2 of 's.json' is a string, not an object.")


def test_single_pretty_printed_object(tmp_path):
    path = write(tmp_path / "o.json", '{\n  "data": [1, 2]\n}\n')
    assert error_of(path).startswith("'o.json' holds one JSON object, not a list of rows.")


def test_json_empty_array_and_not_json(tmp_path):
    assert "holds an empty JSON array" in error_of(write(tmp_path / "e.json", "[]"))
    assert "If it is CSV, rename it to .csv" in error_of(write(tmp_path / "c.json", "a,b\n1,2\n"))


def test_parquet_that_is_not_parquet(tmp_path):
    msg = error_of(write(tmp_path / "p.parquet", '[{"a": "x"}]'))
    assert msg.startswith("'p.parquet' is not a Parquet file (Parquet files start and end with 'PAR1').")
    assert "It looks like JSON: rename it to .json or .jsonl." in msg
    assert "truncated" in error_of(write(tmp_path / "q.parquet", b"PAR1" + b"\x00" * 20))


def test_unsupported_extension_lists_supported_ones(tmp_path):
    msg = error_of(write(tmp_path / "notes.txt", "hello"))
    assert msg.startswith("'notes.txt' has .txt, which is not a supported dataset file.")
    assert "Supported: .json, .jsonl, .csv, .parquet." in msg


def test_csv_problems(tmp_path):
    assert error_of(write(tmp_path / "r.csv", "a,b\nx,y\nx,y,z\n")).startswith(
        "Row 2 of 'r.csv' (line 3) has 3 values but the header has 2 columns."
    )
    assert "duplicate column names in its header: a" in error_of(write(tmp_path / "d.csv", "a,b,a\n1,2,3\n"))
    assert "has a header but no rows" in error_of(write(tmp_path / "h.csv", "a,b\n"))
