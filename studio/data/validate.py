"""Validate every row of a file and report all problems together, never just the first."""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.core.problems import Severity
from studio.data.errors import RowError, RowIssue
from studio.data.formats import REQUIRED_FIELDS, ColumnMap, Example, check_format, row_to_example
from studio.data.readers import file_columns

MAX_LISTED_ISSUES = 20


@dataclass
class ValidationReport:
    examples: list[Example]  # preference data: PreferencePair / LabeledCompletion items (data.preference)
    kept_rows: list[int]  # 1-based row number of each example, same order
    issues: list[RowIssue] = field(default_factory=list)
    total_rows: int = 0

    @property
    def errors(self) -> list[RowIssue]:
        return [i for i in self.issues if i.severity == Severity.ERROR]

    @property
    def warnings(self) -> list[RowIssue]:
        return [i for i in self.issues if i.severity == Severity.WARNING]

    @property
    def fatal(self) -> bool:
        return bool(self.errors)

    def summary(self) -> str:
        """One paragraph for a person: counts, then the first issues, then what to do."""
        usable = len(self.examples)
        parts = [f"{self.total_rows} rows read, {usable} usable."]
        errors, warnings = self.errors, self.warnings
        if errors:
            parts.append(f"{_count(errors, 'problem')} to fix: {_listing(errors)}.")
        if warnings:
            parts.append(f"{_count(warnings, 'row')} skipped: {_listing(warnings)}.")
        if any(i.row > 0 for i in errors):
            parts.append("Fix these rows in the file, or choose 'skip invalid rows' to leave them out.")
        return " ".join(parts)


def validate_rows(
    rows: list[dict], fmt: str, cmap: ColumnMap | None = None, skip_invalid: bool = False
) -> ValidationReport:
    """Check every row against `fmt`. Row errors become warnings (and the row is dropped) if skip_invalid."""
    check_format(fmt)
    cmap = cmap or ColumnMap()
    report = ValidationReport(examples=[], kept_rows=[], total_rows=len(rows))
    if not rows:
        report.issues.append(RowIssue(0, "the file has no rows. Add at least one row."))
        return report

    columns = file_columns(rows)
    missing = [cmap.name(f, fmt) for f in REQUIRED_FIELDS[fmt] if cmap.name(f, fmt) not in columns]
    if missing:
        # one file-level message instead of the same complaint on every row
        names = ", ".join(f"'{m}'" for m in missing)
        example_map = ", ".join(f'"{f}": "<your column>"' for f in REQUIRED_FIELDS[fmt])
        report.issues.append(
            RowIssue(
                0,
                f"the {fmt} format needs the column {names}, which the file does not have. The file's "
                f"columns are: {', '.join(columns)}. Give a column map that names your columns "
                f"(e.g. {{{example_map}}}) or choose another format.",
            )
        )
        return report

    severity = Severity.WARNING if skip_invalid else Severity.ERROR
    for number, row in enumerate(rows, start=1):
        try:
            example = row_to_example(row, fmt, cmap)
        except RowError as e:
            report.issues.append(RowIssue(number, str(e), severity))
            continue
        report.examples.append(example)
        report.kept_rows.append(number)

    if not report.examples:
        report.issues.insert(
            0,
            RowIssue(
                0,
                f"none of the {len(rows)} rows is usable as {fmt}. Check that the format and column map "
                "match the file (see the row problems below).",
            ),
        )
    return report


def _count(issues: list[RowIssue], noun: str) -> str:
    return f"{len(issues)} {noun}{'' if len(issues) == 1 else 's'}"


def _listing(issues: list[RowIssue]) -> str:
    shown = "; ".join(i.describe().rstrip(".") for i in issues[:MAX_LISTED_ISSUES])
    rest = len(issues) - MAX_LISTED_ISSUES
    return shown + (f"; and {rest} more" if rest > 0 else "")
