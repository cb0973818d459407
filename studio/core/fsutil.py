"""Writing files so that a reader never sees half of one: the one tmp-then-replace of the studio."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: Path | str, data: str | bytes, mode: int = 0o644) -> Path:
    """Write `data` (text as UTF-8) to a temporary file beside `path`, then replace `path` with it: a reader
    (the UI's timer, the hub, an export running meanwhile) sees the old file or the new one, never half of
    one. The temporary name is unique per call, so two writers never share it; it is removed on failure.
    Creates the parent folder. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, mode)  # mkstemp makes it private; these files are read by other processes and people
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path | str, data: Any, **dumps: Any) -> Path:
    """`data` as JSON (indent 2 unless told otherwise), written with `atomic_write`."""
    dumps.setdefault("indent", 2)
    return atomic_write(path, json.dumps(data, **dumps))
