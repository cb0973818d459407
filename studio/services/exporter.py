"""Export in a child process: `studio export --json`, read as JSON lines.

Loading a base model for merging inside the web server would keep its memory (and VRAM) held long after
the export, so the merge runs in a child (the CLI, started without a shell through studio.core.procs). It
reports one JSON object per line: `progress` while it works, then one `result` or one `error`. The child
and everything it started are ended when the export is done, times out, or its reader stops listening.
"""

from __future__ import annotations

import json
import queue
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from studio.core import procs

EXPORT_TIMEOUT_S = 1800
KINDS = ("merged", "adapter")
LAST_LINE_EXIT_S = 10.0  # how long a child that sent its result or error may take to exit


@dataclass(frozen=True)
class ExportEvent:
    """One line of the child's report. kind: progress, result or error; data: the rest of the object
    (a result's out_dir, files and zip; an error's code)."""

    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.kind in ("result", "error")


def export_command(
    run: str, kind: str, out_dir: PathLike | str, dtype: str = "fp32", overwrite: bool = False, make_zip: bool = True
) -> list[str]:
    """The `studio export --json` command line for one export (kind: merged or adapter)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    flag = "--merge" if kind == "merged" else "--adapter"
    args = ["export", run, flag, str(out_dir), "--dtype", dtype, "--json"]
    args += ["--zip"] if make_zip else []
    args += ["--overwrite"] if overwrite else []
    return procs.python_command("studio.cli", *args)


def parse_event(line: str) -> ExportEvent | None:
    """A report line as an event; None for anything else the child printed (a library's warning)."""
    try:
        body = json.loads(line)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("type") not in ("progress", "result", "error"):
        return None
    data = {k: v for k, v in body.items() if k not in ("type", "message")}
    return ExportEvent(body["type"], str(body.get("message", "")), data)


def missing_result(code: int | None, output: list[str]) -> ExportEvent:
    """The error for a child that ended without a result or an error line (killed, or a crash)."""
    last = next((line for line in reversed(output) if line.strip()), "")
    reason = f": {last.strip()}" if last else ""
    return ExportEvent("error", f"the export process ended ({procs.exit_description(code)}){reason}", {"code": code})


def export_events(
    home: PathLike | str,
    run: str,
    kind: str,
    out_dir: PathLike | str,
    dtype: str = "fp32",
    overwrite: bool = False,
    timeout_s: float = EXPORT_TIMEOUT_S,
) -> Iterator[ExportEvent]:
    """Run one export in a child process and yield its events as they come; the last one is a result or an
    error. Stopping the iteration early (closing the generator) ends the child and its tree."""
    cmd = export_command(run, kind, out_dir, dtype, overwrite)
    popen = procs.spawn(cmd, procs.python_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield from _read_report(popen, time.monotonic() + timeout_s, timeout_s)
    finally:
        procs.end(popen)  # a no-op after its last line; on a timeout, or when the reader stops, ends it now


def _read_report(popen: subprocess.Popen, deadline: float, timeout_s: float) -> Iterator[ExportEvent]:
    lines = procs.read_lines(popen.stdout)
    output: list[str] = []  # what was not a report line, for an error without one
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            minutes = round(timeout_s / 60)
            yield ExportEvent("error", f"the export took longer than {minutes} minutes and was stopped.")
            return
        if line is None:
            break
        event = parse_event(line)
        if event is None:
            output = [*output[-19:], line]
            continue
        if not event.final:
            yield event
            continue
        _wait(popen, LAST_LINE_EXIT_S)  # it exits by itself after its last line
        yield event
        return
    yield missing_result(_wait(popen, max(1.0, deadline - time.monotonic())), output)


def _wait(popen: subprocess.Popen, seconds: float) -> int | None:
    try:
        return popen.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def run_export(
    home: PathLike | str,
    run: str,
    kind: str,
    out_dir: PathLike | str,
    dtype: str = "fp32",
    overwrite: bool = False,
    timeout_s: float = EXPORT_TIMEOUT_S,
) -> ExportEvent:
    """The export's final event (result or error), for callers that need no progress."""
    events = list(export_events(home, run, kind, Path(out_dir), dtype, overwrite, timeout_s))
    return events[-1]
