"""validate_rows: every bad row reported, file-level problems once, skip_invalid makes errors warnings."""

from __future__ import annotations

from studio.data import ColumnMap, RowIssue, validate_rows

GOOD = {"instruction": "q", "input": "", "output": "a"}


def rows_with_bad(bad_at: set[int], total: int) -> list[dict]:
    return [{"instruction": f"q{i}", "output": "" if i in bad_at else f"a{i}"} for i in range(1, total + 1)]


def test_every_bad_row_is_reported_with_its_number():
    rows = [
        GOOD,
        {"instruction": "q", "output": None},
        GOOD,
        {"instruction": "q", "output": 7},
        {"output": "a"},
    ]
    report = validate_rows(rows, "alpaca", ColumnMap())
    assert report.total_rows == 5
    assert report.kept_rows == [1, 3]
    assert len(report.examples) == 2
    assert [(i.row, i.severity) for i in report.issues] == [(2, "error"), (4, "error"), (5, "error")]
    assert report.issues[0].reason == "'output' is missing (no value). Fill it in, or delete the row."
    assert report.fatal
    assert report.warnings == []


def test_skip_invalid_turns_row_errors_into_warnings():
    report = validate_rows(rows_with_bad({2, 3}, 4), "alpaca", skip_invalid=True)
    assert not report.fatal
    assert report.kept_rows == [1, 4]
    assert [(i.row, i.severity) for i in report.warnings] == [(2, "warning"), (3, "warning")]
    assert report.summary() == (
        "4 rows read, 2 usable. 2 rows skipped: row 2: 'output' is empty. Write the text, or delete the row; "
        "row 3: 'output' is empty. Write the text, or delete the row."
    )


def test_missing_column_is_one_file_level_issue_even_when_skipping():
    rows = [{"instruction": "q", "answer": "a"}, {"instruction": "q2", "answer": "b"}]
    for skip in (False, True):
        report = validate_rows(rows, "alpaca", skip_invalid=skip)
        assert report.fatal
        assert report.examples == []
        assert report.issues == [
            RowIssue(
                0,
                "the alpaca format needs the column 'output', which the file does not have. The file's "
                "columns are: instruction, answer. Give a column map that names your columns (e.g. "
                '{"instruction": "<your column>", "output": "<your column>"}) or choose another format.',
            )
        ]


def test_column_map_makes_the_same_file_valid():
    rows = [{"instruction": "q", "answer": "a"}]
    report = validate_rows(rows, "alpaca", ColumnMap(output="answer"))
    assert not report.fatal
    assert report.kept_rows == [1]


def test_zero_valid_rows_is_fatal_even_when_skipping():
    report = validate_rows(rows_with_bad({1, 2}, 2), "alpaca", skip_invalid=True)
    assert report.fatal
    assert [(i.row, i.severity) for i in report.issues] == [(0, "error"), (1, "warning"), (2, "warning")]
    assert report.errors[0].reason.startswith("none of the 2 rows is usable as alpaca.")


def test_empty_file_is_fatal():
    report = validate_rows([], "text")
    assert report.fatal
    assert report.issues == [RowIssue(0, "the file has no rows. Add at least one row.")]


def test_summary_lists_twenty_issues_then_counts_the_rest():
    report = validate_rows(rows_with_bad(set(range(2, 27)), 30), "alpaca")
    summary = report.summary()
    assert summary.startswith("30 rows read, 5 usable. 25 problems to fix: row 2: 'output' is empty.")
    assert "row 21: 'output' is empty" in summary
    assert "row 22:" not in summary
    assert summary.endswith(
        "; and 5 more. Fix these rows in the file, or choose 'skip invalid rows' to leave them out."
    )


def test_messages_formats_are_validated_row_by_row():
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": None},
    ]
    report = validate_rows(rows, "openai")
    assert report.kept_rows == [1]
    assert [i.row for i in report.errors] == [2, 3]
    assert report.errors[1].reason == "'messages' is missing. Every openai row needs a list of messages in 'messages'."
