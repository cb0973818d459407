"""Errors of the data layer. Every message says what is wrong and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio.core.errors import StudioError
from studio.core.problems import Severity


class DataError(StudioError):
    """A problem with a dataset that the user can fix; the message is shown to them as is.

    `report` carries the ValidationReport when validation was the cause, so a UI can list every row.
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class RowError(DataError):
    """One row cannot be turned into an example. The reason does not name the row: the caller knows it."""


SEVERITIES = (Severity.ERROR, Severity.WARNING)  # a bad row: refused (error) or skipped (warning)


@dataclass(frozen=True)
class RowIssue:
    """A problem found in one row. `row` is 1-based as a user counts records in the file; 0 = whole file."""

    row: int
    reason: str
    severity: Severity = Severity.ERROR

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            allowed = tuple(map(str, SEVERITIES))
            raise ValueError(f"RowIssue severity must be one of {allowed}, got {self.severity!r}")
        object.__setattr__(self, "severity", Severity(self.severity))

    def describe(self) -> str:
        where = "file" if self.row == 0 else f"row {self.row}"
        return f"{where}: {self.reason}"
