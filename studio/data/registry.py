"""The dataset registry: STUDIO_HOME/datasets/<name>/{data.<ext>, entry.json} plus the bundled samples.

Adding is all-or-nothing: everything is checked first, the folder is built under a temporary name
inside the registry and renamed into place, so a failure never leaves a half-registered dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from studio.core.workspace import bundled_datasets_dir, datasets_dir
from studio.data.clean import CleanOptions, CleanReport, clean_examples
from studio.data.errors import DataError
from studio.data.formats import ColumnMap, Example, check_format, detect_format, guess_column_map
from studio.data.llamafactory import map_entry, read_dataset_info
from studio.data.preference import (
    PREFERENCE_FORMATS,
    LabeledCompletion,
    PreferenceColumns,
    PreferencePair,
    detect_preference_format,
    validate_preference_rows,
)
from studio.data.readers import SUPPORTED_EXTENSIONS, file_columns, read_rows
from studio.data.validate import ValidationReport, validate_rows

ENTRY_FILE = "entry.json"
BUNDLED_INFO = "dataset_info.json"
MAX_NAME_LEN = 64
DEFAULT_MAX_BYTES = 200 * 1024 * 1024
MAX_MB_ENV = "STUDIO_MAX_DATASET_MB"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_GOOD_NAME = "e.g. 'support-chats-v2'"

# (path, mtime_ns, size) -> (rows, sha256) of bundled files: computed once per process, on demand
_bundled_cache: dict[tuple[str, int, int], tuple[int, str]] = {}


@dataclass
class DatasetEntry:
    name: str
    file: str  # relative to the registry folder (bundled: to the bundled datasets folder)
    format: str
    column_map: dict
    rows: int  # usable examples after validation and cleaning
    sha256: str
    source: str  # where the file was registered from
    created_at: str  # ISO 8601, UTC
    split: str = "train"
    description: str = ""
    bundled: bool = False
    clean: dict = field(default_factory=dict)  # CleanOptions used, reapplied by load_examples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetEntry:
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise DataError(f"Dataset entry is missing {', '.join(missing)}. Remove the dataset and register it again.")
        return cls(**{k: v for k, v in data.items() if k in names})  # unknown keys: from a newer version


def validate_dataset_name(name: str) -> str | None:
    """What is wrong with `name` as a dataset name, or None if it is fine."""
    rule = None
    if not isinstance(name, str) or not name:
        rule = "is empty"
    elif len(name) > MAX_NAME_LEN:
        rule = f"is {len(name)} characters long; the limit is {MAX_NAME_LEN}"
    elif "/" in name or "\\" in name:
        rule = "contains a slash; a name cannot be a path"
    elif ".." in name:
        rule = "contains '..'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        rule = "contains control characters"
    elif name.startswith("."):
        rule = "starts with a dot"
    else:
        bad = sorted({c for c in name if c not in _NAME_CHARS})
        if bad:
            rule = f"contains {', '.join(repr(c) for c in bad)}"
    if rule is None:
        return None
    return (
        f"The dataset name {name!r} {rule}. Use up to {MAX_NAME_LEN} letters, digits, '-', '_' or '.', "
        f"not starting with a dot, {_GOOD_NAME}."
    )


def max_dataset_bytes() -> int:
    """The size limit for a dataset file: STUDIO_MAX_DATASET_MB, read here only, so the CLI and the UI agree."""
    raw = os.environ.get(MAX_MB_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb > 0:
        raise DataError(
            f"{MAX_MB_ENV}={raw!r} is not a size in MiB. Set it to a positive number (e.g. 500) or unset it."
        )
    return int(mb * 2**20)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 // 10 else f"{n} bytes"  # tiny limits stay readable


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class DatasetRegistry:
    def __init__(self, home: Path, bundled_dir: Path | None = None) -> None:
        self.home = Path(home)
        self.root = datasets_dir(self.home)
        self.bundled_dir = Path(bundled_dir) if bundled_dir is not None else bundled_datasets_dir()

    # ------------------------------------------------------------ queries

    def list(self) -> list[DatasetEntry]:
        """Registered datasets (by name), then the bundled samples."""
        entries = [self._read_entry(d.name) for d in self._registered_dirs()]
        taken = {e.name for e in entries}
        return entries + [e for e in self._bundled().values() if e.name not in taken]

    def get(self, name: str) -> DatasetEntry:
        self._check_name(name)
        if (self._dir_of(name) / ENTRY_FILE).is_file():
            return self._read_entry(name)
        bundled = self._bundled()
        if name in bundled:
            return bundled[name]
        known = ", ".join(e.name for e in self.list()) or "none"
        raise DataError(f"There is no dataset named '{name}'. Known datasets: {known}. Register it first.")

    def path_of(self, entry: DatasetEntry) -> Path:
        base = (self.bundled_dir if entry.bundled else self.root).resolve()
        path = (base / entry.file).resolve()
        if not path.is_relative_to(base):
            raise DataError(
                f"Dataset '{entry.name}' points outside its folder ({entry.file}). Its entry.json was edited "
                "or is damaged: remove the dataset and register it again."
            )
        return path

    def load_examples(self, name: str, skip_invalid: bool = True) -> list[Example]:
        """The dataset's examples, validated and cleaned as at registration. Checks the file is unchanged."""
        entry = self.get(name)
        path = self._checked_path(entry)
        if entry.format in PREFERENCE_FORMATS:
            raise DataError(
                f"Dataset '{name}' holds {entry.format} data (answers judged better or worse), which supervised "
                "fine-tuning cannot use. Pick it for a preference run (stage dpo, orpo or kto), or pick an "
                "instruction or chat dataset for this one."
            )
        return self._examples(path, entry.format, entry.column_map, entry.clean, skip_invalid, name)[0]

    def load_preference(self, name: str, skip_invalid: bool = True) -> list[PreferencePair | LabeledCompletion]:
        """A preference dataset's pairs (format 'preference') or labelled answers ('kto'), checked as at
        registration; DataError for an instruction or chat dataset."""
        entry = self.get(name)
        if entry.format not in PREFERENCE_FORMATS:
            raise DataError(
                f"Dataset '{name}' is {entry.format} data, with one answer per prompt: a preference run needs "
                "pairs of a better and a worse answer (format preference) or answers labelled good or bad (kto). "
                "Register such a file, or train this dataset with the sft stage."
            )
        path = self._checked_path(entry)
        return self._preference_items(path, entry.format, entry.column_map, skip_invalid, name)

    def _checked_path(self, entry: DatasetEntry) -> Path:
        """The entry's file, refused if missing or changed since it was registered."""
        path = self.path_of(entry)
        if not path.is_file():
            raise DataError(f"The file of dataset '{entry.name}' is missing ({path}). Remove and register it again.")
        if not entry.bundled and file_sha256(path) != entry.sha256:
            raise DataError(
                f"The stored file of dataset '{entry.name}' changed since it was registered (sha256 differs). "
                "Remove the dataset and register the file again."
            )
        return path

    @staticmethod
    def _preference_items(
        path: Path, fmt: str, columns: dict, skip_invalid: bool, name: str
    ) -> list[PreferencePair | LabeledCompletion]:
        report = validate_preference_rows(
            read_rows(path), fmt, PreferenceColumns.from_dict(columns), skip_invalid=skip_invalid
        )
        if report.fatal:
            raise DataError(f"Dataset '{name}' has problems. {report.summary()}", report=report)
        return report.examples

    # ------------------------------------------------------------ changes

    def add(
        self,
        name: str,
        source_path: Path,
        fmt: str | None = None,
        column_map: ColumnMap | dict | None = None,
        description: str = "",
        skip_invalid: bool = False,
        clean: CleanOptions = CleanOptions(),
        max_bytes: int | None = None,
    ) -> tuple[DatasetEntry, ValidationReport, CleanReport]:
        """Check everything, then copy the file in atomically. Raises DataError, changing nothing.
        `max_bytes` defaults to max_dataset_bytes() (STUDIO_MAX_DATASET_MB)."""
        if max_bytes is None:
            max_bytes = max_dataset_bytes()
        self._check_name(name)
        self._check_free(name)
        source = Path(source_path).expanduser()
        if not source.is_file():
            # read_rows says the same, but we need the size before reading
            read_rows(source)
        size = source.stat().st_size
        if size > max_bytes:
            raise DataError(
                f"'{source.name}' is {_size(size)}, over the {_size(max_bytes)} limit. "
                f"Use a smaller file (split it or drop rows), or raise the limit ({MAX_MB_ENV})."
            )
        sha = file_sha256(source)
        rows = read_rows(source)
        fmt = registered_format(rows, fmt)
        cmap, report = _validated(rows, fmt, column_map, skip_invalid)
        if report.fatal:
            raise DataError(f"'{source.name}' cannot be registered as {fmt}. {report.summary()}", report=report)
        if fmt in PREFERENCE_FORMATS:  # no cleaning: stripping or deduplicating answers would change the pairs
            examples, clean_report = report.examples, CleanReport(kept=len(report.examples))
        else:
            examples, clean_report = clean_examples(report.examples, clean)

        entry = DatasetEntry(
            name=name,
            file=f"{name}/data{source.suffix.lower()}",
            format=fmt,
            column_map=cmap.to_dict(),
            rows=len(examples),
            sha256=sha,
            source=str(source.resolve()),
            created_at=_now(),
            description=description,
            clean=clean.to_dict(),
        )
        self._install(entry, source)
        return entry, report, clean_report

    def remove(self, name: str) -> None:
        self._check_name(name)
        folder = self._dir_of(name)
        if not folder.exists():
            if name in self._bundled():
                raise DataError(f"'{name}' is a bundled sample and cannot be removed. It is shipped with the studio.")
            raise DataError(f"There is no dataset named '{name}' to remove. Check the name in the dataset list.")
        # rename first, so the name is gone at once even if deleting the files is slow or fails midway
        trash = Path(tempfile.mkdtemp(prefix=".removing-", dir=self.root))
        os.rename(folder, trash / name)
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------ internals

    def _install(self, entry: DatasetEntry, source: Path) -> None:
        created_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".adding-", dir=self.root))
        try:
            target = tmp / Path(entry.file).name
            shutil.copyfile(source, target)
            if file_sha256(target) != entry.sha256:
                raise DataError(f"'{source.name}' changed while it was being registered. Try again.")
            # entry.json last: a folder without it is never taken for a dataset
            (tmp / ENTRY_FILE).write_text(json.dumps(entry.to_dict(), indent=2) + "\n", encoding="utf-8")
            os.rename(tmp, self._dir_of(entry.name))
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if created_root:
                _rmdir_if_empty(self.root)
            if isinstance(e, OSError):
                raise DataError(
                    f"Could not store dataset '{entry.name}': {e}. Check free disk space and "
                    f"permissions of {self.root}."
                ) from e
            raise

    def _check_name(self, name: str) -> None:
        problem = validate_dataset_name(name)
        if problem:
            raise DataError(problem)

    def _check_free(self, name: str) -> None:
        lowered = name.lower()  # "Facts" and "facts" are the same folder on some file systems
        if lowered in {n.lower() for n in self._bundled()}:
            raise DataError(f"'{name}' is the name of a bundled sample dataset. Choose another name.")
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.lower() == lowered:
                    raise DataError(
                        f"A dataset named '{d.name}' already exists. Choose another name, or remove it first."
                    )

    def _dir_of(self, name: str) -> Path:
        """root/name, refusing anything that would resolve outside the registry folder."""
        root = self.root.resolve()
        path = (root / name).resolve()
        if path.parent != root:
            raise DataError(f"The dataset name {name!r} leads outside the registry folder. {_GOOD_NAME}.")
        return path

    def _registered_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(
            (d for d in self.root.iterdir() if not d.name.startswith(".") and (d / ENTRY_FILE).is_file()),
            key=lambda d: d.name,
        )

    def _read_entry(self, name: str) -> DatasetEntry:
        path = self._dir_of(name) / ENTRY_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            entry = DatasetEntry.from_dict(data)
        except (ValueError, TypeError, DataError) as e:
            raise DataError(f"{path} is damaged ({e}). Remove the dataset '{name}' and register it again.") from e
        return replace(entry, bundled=False)

    def _bundled(self) -> dict[str, DatasetEntry]:
        """Bundled samples described in bundled_dir/dataset_info.json; entries we cannot use are left out."""
        info_path = self.bundled_dir / BUNDLED_INFO
        if not info_path.is_file():
            return {}
        entries = {}
        for name, spec in read_dataset_info(info_path).items():
            try:
                fmt, cmap = map_entry(spec)
            except DataError:
                continue
            file_name = spec.get("file_name", "")
            path = self.bundled_dir / file_name
            if not file_name or not path.is_file() or path.suffix.lower() not in SUPPORTED_EXTENSIONS:
                continue
            try:
                rows, sha = self._bundled_facts(path, fmt, cmap)
            except DataError:  # a broken sample must not break the whole list; a test keeps them valid
                continue
            entries[name] = DatasetEntry(
                name=name,
                file=file_name,
                format=fmt,
                column_map=cmap.to_dict(),
                rows=rows,
                sha256=sha,
                source=str(path),
                created_at=datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds"),
                description=spec.get("description", ""),
                bundled=True,
            )
        return entries

    def _bundled_facts(self, path: Path, fmt: str, cmap: ColumnMap | PreferenceColumns) -> tuple[int, str]:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in _bundled_cache:
            if fmt in PREFERENCE_FORMATS:
                examples = self._preference_items(path, fmt, cmap.to_dict(), True, path.name)
            else:
                examples = self._examples(path, fmt, cmap.to_dict(), {}, True, path.name)[0]
            _bundled_cache[key] = (len(examples), file_sha256(path))
        return _bundled_cache[key]

    @staticmethod
    def _examples(
        path: Path, fmt: str, column_map: dict, clean: dict, skip_invalid: bool, name: str
    ) -> tuple[list[Example], ValidationReport, CleanReport]:
        rows = read_rows(path)
        report = validate_rows(rows, fmt, ColumnMap.from_dict(column_map), skip_invalid=skip_invalid)
        if report.fatal:
            raise DataError(f"Dataset '{name}' has problems. {report.summary()}", report=report)
        examples, clean_report = clean_examples(report.examples, CleanOptions.from_dict(clean))
        return examples, report, clean_report


def registered_format(rows: list[dict], fmt: str | None) -> str:
    """The format to register rows as: the one asked for, else preference columns first (a ranking entry
    also has sharegpt's 'conversations'), else the instruction and chat formats' detection."""
    if fmt:
        return fmt if fmt in PREFERENCE_FORMATS else check_format(fmt)
    return detect_preference_format(file_columns(rows)) or detect_format(rows)


def _validated(
    rows: list[dict], fmt: str, column_map: ColumnMap | PreferenceColumns | dict | None, skip_invalid: bool
) -> tuple[ColumnMap | PreferenceColumns, ValidationReport]:
    """The column map and the validation report of rows as `fmt`."""
    if fmt in PREFERENCE_FORMATS:
        columns = column_map if isinstance(column_map, PreferenceColumns) else PreferenceColumns.from_dict(column_map)
        return columns, validate_preference_rows(rows, fmt, columns, skip_invalid=skip_invalid)
    if column_map is None:
        cmap = guess_column_map(rows, fmt)
    else:
        cmap = column_map if isinstance(column_map, ColumnMap) else ColumnMap.from_dict(column_map)
    return cmap, validate_rows(rows, fmt, cmap, skip_invalid=skip_invalid)


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: someone else put something there meanwhile
        path.rmdir()
