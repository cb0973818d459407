"""Where a run reports: the MetricSink protocol the worker implements (store, log), and event levels."""

from __future__ import annotations

from typing import Protocol


class MetricSink(Protocol):
    def log(self, step: int, **values: float | None) -> None: ...
    def event(self, message: str, level: str = "info") -> None: ...
    def progress(self, step: int, total: int) -> None: ...


EVENT_LEVEL = {"critical": "error", "warning": "warning", "info": "info"}  # coach severity -> event level
