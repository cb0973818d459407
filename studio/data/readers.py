"""Read a dataset file into a list of row dicts, through the `datasets` library.

Before handing a file to `datasets` we check it ourselves: its errors ("An error occurred while
generating the dataset") do not tell a user which line to fix, ours do.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from studio.core.security import AccessError, ensure_allowed
from studio.data.errors import DataError

# extension -> the `datasets` packaged loader that reads it
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}

_PARQUET_MAGIC = b"PAR1"
# Magic numbers of binary files people upload by mistake, with a hint of what they are.
_BINARY_KINDS = (
    (_PARQUET_MAGIC, "a Parquet file: rename it to .parquet"),
    (b"PK\x03\x04", "a ZIP archive (or an Excel .xlsx): unzip it, or export the sheet as CSV"),
    (b"\x1f\x8b", "a gzip archive: decompress it first"),
    (b"SQLite format 3", "an SQLite database: export the table as CSV or JSON Lines"),
)
_SNIFF_BYTES = 8192


def read_rows(path: Path) -> list[dict]:
    """All rows of a .json / .jsonl / .csv / .parquet file, as dicts with the union of all columns."""
    path = Path(path)
    name = path.name
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        shown = ext or "no extension"
        raise DataError(
            f"'{name}' has {shown!s}, which is not a supported dataset file. Supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}. Convert the file to one of these (or fix its extension "
            "if the content already is one)."
        )
    try:
        ensure_allowed(path, "Dataset file")
    except AccessError as err:  # a network-facing server reads only under its allowed roots
        raise DataError(str(err)) from err
    if not path.exists():
        raise DataError(f"File not found: {path}. Check the path and that the file was not moved or deleted.")
    if not path.is_file():
        raise DataError(f"{path} is a folder, not a file. Choose the data file inside it.")
    data = path.read_bytes()
    if not data:
        raise DataError(f"'{name}' is empty (0 bytes). Choose the file that holds your rows, or re-export it.")

    if ext == ".parquet":
        _check_parquet(data, name)
        columns = None
    else:
        text = _decode_text(data, name)
        if not text.strip():
            raise DataError(f"'{name}' holds only whitespace, no rows. Choose the file that holds your rows.")
        if ext == ".csv":
            columns = _check_csv(text, name)
        else:
            _check_json(text, name)
            columns = None

    rows = _load_with_datasets(SUPPORTED_EXTENSIONS[ext], path, csv_columns=columns)
    if not rows:
        raise DataError(f"'{name}' holds no rows. Add at least one row.")
    return rows


def file_columns(rows: list[dict]) -> list[str]:
    """The union of the rows' keys, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _decode_text(data: bytes, name: str) -> str:
    for magic, what in _BINARY_KINDS:
        if data.startswith(magic):
            raise DataError(f"'{name}' is not text: it looks like {what}.")
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise DataError(
            f"'{name}' contains binary data (NUL bytes), not text. JSON, JSON Lines and CSV files must be "
            "plain UTF-8 text: re-export the data in one of these formats."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"'{name}' is not UTF-8 text: byte 0x{data[e.start]:02X} at byte offset {e.start} (line {line}) "
            "cannot be decoded. Re-save the file with UTF-8 encoding (most editors offer it under "
            "'Save as' / 'Encoding')."
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark is harmless; `datasets` skips it too


def _check_json(text: str, name: str) -> None:
    first = text.lstrip()[0]
    if first == "[":
        _check_json_array(text, name)
    elif first == "{":
        _check_json_lines(text, name)
    else:
        raise DataError(
            f"'{name}' is not JSON: it starts with {first!r}, while a dataset file starts with '[' (a JSON "
            "array of objects) or '{' (JSON Lines, one object per line). If it is CSV, rename it to .csv."
        )


def _check_json_array(text: str, name: str) -> None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"'{name}' is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. The file may be "
            "truncated or hand-edited; fix that spot or export the file again."
        ) from None
    if not value:
        raise DataError(f"'{name}' holds an empty JSON array: no rows. Add at least one row.")
    for i, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DataError(
                f"Row {i} of '{name}' is {_json_kind(item)}, not an object. Every element of the array must "
                'be one row, like {"instruction": "...", "output": "..."}.'
            )


def _check_json_lines(text: str, name: str) -> None:
    # split on "\n" only: str.splitlines() would also split on U+2028, which JSON strings may hold raw
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            if _is_single_object(text):
                raise DataError(
                    f"'{name}' holds one JSON object, not a list of rows. Put the rows in a JSON array "
                    "([{...}, {...}]) or write one object per line (JSON Lines)."
                ) from None
            raise DataError(
                f"Line {lineno} of '{name}' is not valid JSON ({e.msg} at column {e.colno}). In JSON Lines "
                "every line must be one complete object: fix or delete that line."
            ) from None
        if not isinstance(value, dict):
            raise DataError(
                f"Line {lineno} of '{name}' is {_json_kind(value)}, not an object. In JSON Lines every line "
                'must be one row, like {"instruction": "...", "output": "..."}.'
            )


def _is_single_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _check_csv(text: str, name: str) -> list[str]:
    """Check the header and that every row has as many values as the header; return the column names."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
        while not header:  # blank lines before the header
            header = next(reader)
        names = [h.strip() for h in header]
        dupes = sorted({h for h in names if names.count(h) > 1 and h})
        if dupes:
            raise DataError(
                f"'{name}' has duplicate column names in its header: {', '.join(dupes)}. Rename them so "
                "each column has its own name."
            )
        rows = 0
        for fields in reader:
            if not fields:  # blank line: pandas skips it as well
                continue
            rows += 1
            if len(fields) != len(header):
                raise DataError(
                    f"Row {rows} of '{name}' (line {reader.line_num}) has {len(fields)} values but the "
                    f"header has {len(header)} columns. Quote values that contain commas or line breaks "
                    '("like, this"), or fix the row.'
                )
    except csv.Error as e:
        raise DataError(f"'{name}' is not valid CSV near line {reader.line_num}: {e}. Fix the quoting there.") from None
    except StopIteration:
        raise DataError(f"'{name}' has no header line. The first line must name the columns.") from None
    if rows == 0:
        raise DataError(f"'{name}' has a header but no rows. Add at least one row below the header.")
    return header


def _load_with_datasets(kind: str, path: Path, csv_columns: list[str] | None) -> list[dict]:
    import datasets  # heavy (about 1 s): only when a file is actually read

    kwargs: dict[str, Any] = {}
    if kind == "csv" and csv_columns is not None:
        # CSV has no types: keep every cell as the text the user wrote ("NA", "001" stay as they are)
        kwargs["features"] = datasets.Features({c: datasets.Value("string") for c in csv_columns})
        kwargs["keep_default_na"] = False
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        # a throw-away cache: reading a file must not leave copies under ~/.cache
        with tempfile.TemporaryDirectory(prefix="studio-read-") as cache:
            ds = datasets.load_dataset(
                kind, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True, **kwargs
            )
            return ds.to_list()
    except Exception as e:  # datasets/pyarrow raise many types; the user needs one message
        detail = f"{type(e).__name__}: {e}".strip()
        if e.__cause__ is not None:
            detail += f" ({e.__cause__})"
        raise DataError(
            f"Could not read '{path.name}' as {kind}: {detail}. Check that the file is a complete, valid "
            f"{kind} file (re-export it if in doubt)."
        ) from e
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()


def _check_parquet(data: bytes, name: str) -> None:
    if len(data) < 12 or not (data.startswith(_PARQUET_MAGIC) and data.endswith(_PARQUET_MAGIC)):
        hint = ""
        head = data[:64].lstrip()
        if head[:1] in (b"[", b"{"):
            hint = " It looks like JSON: rename it to .json or .jsonl."
        elif data.startswith(_PARQUET_MAGIC):
            hint = " It starts like Parquet but its end is missing: the file is probably truncated."
        raise DataError(
            f"'{name}' is not a Parquet file (Parquet files start and end with 'PAR1').{hint} "
            "Export it again as Parquet, or use .json / .jsonl / .csv."
        )
