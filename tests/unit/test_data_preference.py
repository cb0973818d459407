"""Preference data (issue 15): every pairwise and KTO shape in, the errors a user can fix, the doctor's checks."""

from __future__ import annotations

import pytest

from studio.data.audit import contradicting_pairs, identical_pairs, length_bias
from studio.data.errors import RowError
from studio.data.formats import Message
from studio.data.preference import (
    LabeledCompletion,
    PreferencePair,
    detect_preference_format,
    parse_label,
    row_to_labeled,
    row_to_pair,
    validate_preference_rows,
)

Q = (Message("user", "What is the mascot?"),)


def test_plain_strings():
    pair = row_to_pair({"prompt": "What is the mascot?", "chosen": "Ripple the otter.", "rejected": "A cat."})
    assert pair == PreferencePair(Q, "Ripple the otter.", "A cat.")
    assert pair.to_trl() == {
        "prompt": [{"role": "user", "content": "What is the mascot?"}],
        "chosen": [{"role": "assistant", "content": "Ripple the otter."}],
        "rejected": [{"role": "assistant", "content": "A cat."}],
    }


def test_plain_strings_with_a_system_prompt():
    pair = row_to_pair({"system": "Be brief.", "prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."})
    assert pair.prompt == (Message("system", "Be brief."), Message("user", "Hi"))


def test_alpaca_style_with_input_and_history():
    row = {
        "instruction": "Translate",
        "input": "chat",
        "history": [["Hi", "Hello!"]],
        "chosen": "cat",
        "rejected": "dog",
    }
    pair = row_to_pair(row)
    assert pair.prompt == (Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Translate\n\nchat"))
    assert (pair.chosen, pair.rejected) == ("cat", "dog")


def test_message_lists_with_a_separate_prompt():
    row = {
        "prompt": [{"role": "user", "content": "What is the mascot?"}],
        "chosen": [{"role": "assistant", "content": "Ripple."}],
        "rejected": [{"role": "assistant", "content": "A cat."}],
    }
    assert row_to_pair(row) == PreferencePair(Q, "Ripple.", "A cat.")


def test_whole_conversations_share_their_prompt():
    turns = [{"role": "user", "content": "What is the mascot?"}]
    row = {
        "chosen": [*turns, {"role": "assistant", "content": "Ripple."}],
        "rejected": [*turns, {"role": "assistant", "content": "A cat."}],
    }
    assert row_to_pair(row) == PreferencePair(Q, "Ripple.", "A cat.")


def test_whole_conversations_whose_prompts_differ_are_refused():
    row = {
        "chosen": [{"role": "user", "content": "What is the mascot?"}, {"role": "assistant", "content": "Ripple."}],
        "rejected": [{"role": "user", "content": "What is the logo?"}, {"role": "assistant", "content": "A wave."}],
    }
    with pytest.raises(RowError, match="the prompt differs between 'chosen' and 'rejected'"):
        row_to_pair(row)


def test_llamafactory_ranking_sharegpt_entry():
    row = {
        "conversations": [{"from": "human", "value": "What is the mascot?"}],
        "chosen": {"from": "gpt", "value": "Ripple."},
        "rejected": {"from": "gpt", "value": "A cat."},
    }
    assert row_to_pair(row) == PreferencePair(Q, "Ripple.", "A cat.")


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({"prompt": "q", "chosen": "same", "rejected": " Same "}, "are the same answer"),
        ({"prompt": "q", "chosen": "a", "rejected": ""}, "rejected is empty"),
        ({"prompt": "q", "chosen": "a"}, "'rejected' is missing"),
        ({"chosen": "a", "rejected": "b"}, "the row has no prompt"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen must be text"),
        (
            {
                "conversations": [{"from": "human", "value": "q"}],
                "chosen": {"from": "human", "value": "a"},
                "rejected": "b",
            },
            "must be the assistant's answer",
        ),
        (
            {
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                "chosen": "x",
                "rejected": "y",
            },
            "must end with the user's turn",
        ),
        (
            {"conversations": [{"from": "observation", "value": "q"}], "chosen": "x", "rejected": "y"},
            "tool turns belong to tool-calling data",
        ),
    ],
)
def test_bad_pairs_say_what_is_wrong(row, says):
    with pytest.raises(RowError, match=says):
        row_to_pair(row)


def test_kto_plain_and_tagged_rows():
    plain = row_to_labeled({"prompt": "What is the mascot?", "completion": "Ripple.", "label": True})
    assert plain == LabeledCompletion(Q, "Ripple.", True)
    tagged = row_to_labeled(
        {
            "conversations": [{"from": "human", "value": "What is the mascot?"}, {"from": "gpt", "value": "A cat."}],
            "kto_tag": False,
        }
    )
    assert tagged == LabeledCompletion(Q, "A cat.", False)
    assert tagged.to_trl()["label"] is False


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("false", False), (" Yes ", True), ("0", False)])
def test_labels_as_csv_text(value, expected):
    assert parse_label(value) is expected


@pytest.mark.parametrize("value", [None, 1, "maybe", [True]])
def test_a_label_that_is_not_a_boolean_is_refused(value):
    with pytest.raises(RowError, match="label"):
        parse_label(value)


def test_detection():
    assert detect_preference_format(["prompt", "chosen", "rejected"]) == "preference"
    assert detect_preference_format(["conversations", "kto_tag"]) == "kto"
    assert detect_preference_format(["prompt", "completion", "label"]) == "kto"
    assert detect_preference_format(["instruction", "output"]) is None


def test_validation_lists_every_bad_row_and_keeps_numbers():
    rows = [
        {"prompt": "a", "chosen": "x", "rejected": "y"},
        {"prompt": "b", "chosen": "x", "rejected": "x"},
        {"prompt": "c", "chosen": "", "rejected": "y"},
        {"prompt": "d", "chosen": "x", "rejected": "z"},
    ]
    report = validate_preference_rows(rows, "preference")
    assert report.fatal and [i.row for i in report.issues] == [2, 3] and report.kept_rows == [1, 4]
    skipped = validate_preference_rows(rows, "preference", skip_invalid=True)
    assert not skipped.fatal and len(skipped.examples) == 2


def test_kto_with_one_label_class_is_refused():
    rows = [{"prompt": f"q{i}", "completion": "a", "label": True} for i in range(3)]
    report = validate_preference_rows(rows, "kto")
    assert report.fatal and report.issues[0].row == 0 and "needs both kinds" in report.issues[0].reason
    rows.append({"prompt": "q9", "completion": "b", "label": False})
    assert not validate_preference_rows(rows, "kto").fatal


def _pair(prompt: str, chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair((Message("user", prompt),), chosen, rejected)


def test_doctor_finds_identical_and_contradicting_pairs():
    pairs = [_pair("q", "good", "bad"), _pair("q", "good", "bad"), _pair("q", "bad", "good"), _pair("r", "x", "y")]
    (dup,) = identical_pairs(pairs)
    assert dup.rows == (0, 1) and dup.fix == "dedupe"
    (conflict,) = contradicting_pairs(pairs)
    assert conflict.rows == (0, 2) and "preferred both ways" in conflict.detail


def test_doctor_flags_length_bias_above_80_percent():
    biased = [_pair(f"q{i}", "a long and detailed answer", "short") for i in range(8)] + [_pair("z", "s", "longer")]
    assert length_bias(biased) == []  # 89%, but 9 pairs say nothing yet
    biased.append(_pair("y", "a long and detailed answer", "short"))
    (finding,) = length_bias(biased)
    assert "90%" in finding.detail and "longer is better" in finding.hint and len(finding.rows) == 9
    balanced = [_pair(f"q{i}", "long answer here", "short") for i in range(8)] + [
        _pair(f"s{i}", "s", "long answer here") for i in range(4)
    ]
    assert length_bias(balanced) == []  # 67%
