"""clean_examples: each rule, the counts, and the message when nothing is left."""

from __future__ import annotations

import pytest

from studio.data import CleanOptions, CleanReport, DataError, Example, Message, clean_examples


def qa(question: str, answer: str) -> Example:
    return Example(messages=(Message("user", question), Message("assistant", answer)))


def test_defaults_strip_drop_empty_and_dedupe():
    examples = [qa(" q ", " a\n"), qa("q", "a"), qa("q2", "   "), qa("q3", "b"), Example(text="  t  ")]
    kept, report = clean_examples(examples, CleanOptions())
    assert kept == [qa("q", "a"), qa("q3", "b"), Example(text="t")]
    assert report == CleanReport(stripped=3, dropped_empty=1, dropped_duplicates=1, kept=3)
    assert report.dropped == 2
    assert report.summary() == (
        "3 examples kept, 1 dropped as empty, 1 dropped as duplicates, 3 stripped of surrounding whitespace."
    )


def test_rules_can_be_switched_off():
    examples = [qa(" q", "a"), qa(" q", "a")]
    kept, report = clean_examples(examples, CleanOptions(strip=False, dedupe=False))
    assert kept == examples
    assert report == CleanReport(kept=2)


def test_answer_length_limits_apply_to_every_assistant_turn():
    multi = Example(
        messages=(
            Message("user", "q"),
            Message("assistant", "ab"),
            Message("user", "q"),
            Message("assistant", "abcdef"),
        )
    )
    examples = [qa("q", "abc"), qa("q", "a"), qa("q", "abcdefgh"), multi]
    kept, report = clean_examples(examples, CleanOptions(min_answer_chars=2, max_answer_chars=6))
    assert kept == [qa("q", "abc"), multi]
    assert (report.dropped_too_short, report.dropped_too_long, report.kept) == (1, 1, 2)
    # "ab" in the first turn is too short, so the whole conversation goes
    kept, report = clean_examples([multi, qa("q", "abc")], CleanOptions(min_answer_chars=3))
    assert kept == [qa("q", "abc")]
    assert report.dropped_too_short == 1


def test_max_total_chars_counts_every_message():
    examples = [qa("12345", "12345"), qa("123456", "12345")]
    kept, report = clean_examples(examples, CleanOptions(max_total_chars=10))
    assert kept == [qa("12345", "12345")]
    assert report.dropped_too_long == 1


def test_everything_filtered_explains_which_rule_and_how_to_relax_it():
    with pytest.raises(DataError) as info:
        clean_examples([qa("q", "ab"), qa("q", "abc"), qa("q", " ")], CleanOptions(min_answer_chars=5))
    assert str(info.value) == (
        "Cleaning removed all 3 examples: 1 were empty after stripping (fill them in); "
        "2 had an answer shorter than min_answer_chars=5 (lower min_answer_chars)."
    )
    with pytest.raises(DataError, match=r"1 were longer than max_answer_chars=2 \(raise or clear the limit\)"):
        clean_examples([qa("q", "abc")], CleanOptions(max_answer_chars=2))


def test_options_are_checked_and_round_trip():
    with pytest.raises(DataError, match="max_answer_chars \\(3\\) is below min_answer_chars \\(5\\)"):
        CleanOptions(min_answer_chars=5, max_answer_chars=3)
    with pytest.raises(DataError, match="min_answer_chars must be 0 or more, got -1"):
        CleanOptions(min_answer_chars=-1)
    with pytest.raises(DataError, match="Unknown cleaning options: lowercase"):
        CleanOptions.from_dict({"lowercase": True})
    opts = CleanOptions(dedupe=False, max_total_chars=100)
    assert CleanOptions.from_dict(opts.to_dict()) == opts
