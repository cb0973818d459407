"""Formats: column maps, detection, and one row -> Example for every format and every row error."""

from __future__ import annotations

import pytest

from studio.data import ColumnMap, DataError, Example, Message, RowError, detect_format, row_to_example
from studio.data.formats import guess_column_map

U, A, S = "user", "assistant", "system"


def msgs(*pairs: tuple[str, str]) -> tuple[Message, ...]:
    return tuple(Message(role, content) for role, content in pairs)


def row_error(row: dict, fmt: str, cmap: ColumnMap | None = None) -> str:
    with pytest.raises(RowError) as info:
        row_to_example(row, fmt, cmap or ColumnMap())
    return str(info.value)


# ---------------------------------------------------------------- ColumnMap


def test_column_map_defaults_per_format():
    cmap = ColumnMap()
    assert cmap.name("messages", "sharegpt") == "conversations"
    assert cmap.name("messages", "openai") == "messages"
    assert cmap.name("user_tag", "sharegpt") == "human"
    assert cmap.name("assistant_tag", "openai") == "assistant"
    assert cmap.name("output", "alpaca") == "output"
    assert cmap.name("text", "text") == "text"
    assert cmap.resolve("sharegpt") == ColumnMap(
        messages="conversations",
        system="system",
        role_tag="from",
        content_tag="value",
        user_tag="human",
        assistant_tag="gpt",
        system_tag="system",
        function_tag="function_call",
        observation_tag="observation",
        tools="tools",
    )


def test_column_map_round_trip_keeps_only_set_fields():
    cmap = ColumnMap(output="answer", instruction="question")
    assert cmap.to_dict() == {"instruction": "question", "output": "answer"}
    assert ColumnMap.from_dict(cmap.to_dict()) == cmap
    assert ColumnMap.from_dict(None) == ColumnMap()


def test_column_map_rejects_unknown_keys_and_empty_names():
    with pytest.raises(DataError, match=r"Unknown column map keys: answer, prompt\. Allowed keys: "):
        ColumnMap.from_dict({"prompt": "q", "answer": "a"})
    with pytest.raises(DataError, match="'output' must be a non-empty column name, got ' '"):
        ColumnMap(output=" ")


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt"),
        ({"messages": [{"role": "user", "content": "q"}]}, "openai"),
        ({"messages": [{"from": "human", "value": "q"}]}, "sharegpt"),
        ({"conversations": [{"role": "user", "content": "q"}]}, "openai"),
        ({"text": "hello", "id": 1}, "text"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format([row]) == fmt


def test_detect_format_failure_lists_columns_and_expectations():
    with pytest.raises(DataError) as info:
        detect_format([{"question": "q", "answer": "a"}])
    msg = str(info.value)
    assert msg.startswith("Could not tell the dataset format. Columns seen: question, answer. Expected: ")
    assert "alpaca needs 'instruction' and 'output'" in msg
    assert "openai needs 'messages' ([{role, content}])" in msg
    assert "column map" in msg


def test_guess_column_map_for_message_variants():
    assert guess_column_map([{"conversations": [{"role": "user", "content": "q"}]}], "openai") == ColumnMap(
        messages="conversations"
    )
    assert guess_column_map([{"messages": [{"from": "human", "value": "q"}]}], "sharegpt") == ColumnMap(
        messages="messages"
    )
    assert guess_column_map([{"messages": [{"role": "user", "content": "q"}]}], "openai") == ColumnMap()
    assert guess_column_map([{"instruction": "q"}], "alpaca") == ColumnMap()


# ---------------------------------------------------------------- alpaca


def test_alpaca_instruction_and_input_are_joined():
    row = {"instruction": "Translate.", "input": "Hallo", "output": "Hello"}
    assert row_to_example(row, "alpaca", ColumnMap()) == Example(
        messages=msgs((U, "Translate.\n\nHallo"), (A, "Hello"))
    )


def test_alpaca_empty_input_system_and_history():
    row = {
        "instruction": "And Veloria?",
        "input": "",
        "output": "Port Amsel.",
        "system": "Be brief.",
        "history": [["Capital of France?", "Paris."]],
    }
    assert row_to_example(row, "alpaca", ColumnMap()).messages == msgs(
        (S, "Be brief."), (U, "Capital of France?"), (A, "Paris."), (U, "And Veloria?"), (A, "Port Amsel.")
    )


def test_alpaca_input_only_and_null_optional_fields():
    row = {"instruction": None, "input": "Just this", "output": "ok", "system": None, "history": None}
    assert row_to_example(row, "alpaca", ColumnMap()).messages == msgs((U, "Just this"), (A, "ok"))


def test_alpaca_with_a_column_map():
    cmap = ColumnMap(instruction="question", output="answer")
    assert row_to_example({"question": "q", "answer": "a"}, "alpaca", cmap).messages == msgs((U, "q"), (A, "a"))


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "q"}, "'output' is missing (no value). Fill it in, or delete the row."),
        (
            {"instruction": "q", "output": None},
            "'output' is missing (no value). Fill it in, or delete the row.",
        ),
        ({"instruction": "q", "output": "  "}, "'output' is empty. Write the text, or delete the row."),
        (
            {"instruction": "q", "output": 5},
            "'output' must be text, got a number (5): put it in quotes to make it text, e.g. \"42\".",
        ),
        (
            {"instruction": "q", "output": {"text": "a"}},
            "'output' must be text, got an object ({...}): write the text itself, not a nested structure.",
        ),
        (
            {"instruction": ["q"], "output": "a"},
            "'instruction' must be text, got a list ([...]): write the text itself, not a nested structure.",
        ),
        (
            {"instruction": "", "input": "", "output": "a"},
            "'instruction' is empty or missing: the row has an answer but no question. "
            "Write the instruction, or delete the row.",
        ),
        (
            {"instruction": "q", "output": "a", "history": "hi"},
            "'history' must be a list of [question, answer] pairs, got text. Write it like [[\"Hi\", "
            '"Hello!"]], or leave it empty.',
        ),
        (
            {"instruction": "q", "output": "a", "history": [["u", "v"], ["only one"]]},
            "'history' entry 2 must be a [question, answer] pair of two texts, got ['only one']. Write it "
            'like ["Hi", "Hello!"].',
        ),
    ],
)
def test_alpaca_row_errors(row, expected):
    assert row_error(row, "alpaca") == expected


# ---------------------------------------------------------------- sharegpt / openai


def test_sharegpt_roles_are_normalised_and_system_column_prepended():
    row = {
        "conversations": [
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "user", "value": "q2"},
            {"from": "assistant", "value": "a2"},
        ],
        "system": "sys",
    }
    assert row_to_example(row, "sharegpt", ColumnMap()).messages == msgs(
        (S, "sys"), (U, "q1"), (A, "a1"), (U, "q2"), (A, "a2")
    )


def test_sharegpt_system_message_and_custom_tags():
    cmap = ColumnMap(messages="turns", role_tag="speaker", content_tag="text", user_tag="Q", assistant_tag="R")
    row = {
        "turns": [
            {"speaker": "system", "text": "s"},
            {"speaker": "Q", "text": "q"},
            {"speaker": "R", "text": "r"},
        ]
    }
    assert row_to_example(row, "sharegpt", cmap).messages == msgs((S, "s"), (U, "q"), (A, "r"))


def test_openai_messages():
    row = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert row_to_example(row, "openai", ColumnMap()) == Example(messages=msgs((S, "s"), (U, "q"), (A, "a")))


def conv(*items):
    return {"messages": [{"role": r, "content": c} for r, c in items]}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"messages": []},
            "'messages' is an empty conversation. Add at least a user and an assistant message.",
        ),
        ({}, "'messages' is missing. Every openai row needs a list of messages in 'messages'."),
        (
            {"messages": "[...]"},
            "'messages' must be a list of messages, got text (CSV cannot hold lists: use JSON Lines).",
        ),
        (
            conv((S, "s")),
            "the conversation has only a system message. Add a user and an assistant message.",
        ),
        (
            conv((U, "q"), ("tool", "x"), (A, "a")),
            "message 2 is a tool result with no call before it. Put it right after the assistant's tool call, "
            "or remove it.",
        ),
        (
            conv((U, "q"), (U, "q2"), (A, "a")),
            "message 2 is from user but assistant was expected: user and assistant turns must alternate, "
            "starting with user. Merge or remove the extra message.",
        ),
        (
            conv((S, "s"), (A, "a")),
            "message 2 is from assistant but user was expected: user and assistant turns must alternate, "
            "starting with user. Merge or remove the extra message.",
        ),
        (
            conv((U, "q"), (A, "a"), (U, "q2")),
            "the conversation ends with a user message. The last message must be the assistant's answer: "
            "add it, or remove the final user message.",
        ),
        (
            conv((U, "q"), (S, "s"), (A, "a")),
            "message 2 (system): a system message may only come first. Move it to the start, or remove it.",
        ),
        (
            conv((U, "q"), (A, 42)),
            "message 2 (assistant): 'content' must be text, got a number (42): put it in quotes to make it "
            'text, e.g. "42".',
        ),
        (
            conv((U, {"t": "q"}), (A, "a")),
            "message 1 (user): 'content' must be text, got an object ({...}): write the text itself, not a "
            "nested structure.",
        ),
        (conv((U, "q"), (A, " ")), "message 2 (assistant) is empty. Write the text, or remove the message."),
        (
            {"messages": [{"content": "q"}]},
            "message 1 has no 'role'. Say who speaks: 'user', 'assistant', 'system', 'tool'.",
        ),
        (
            {"messages": [{"role": "user"}]},
            "message 1 (user) has no 'content'. Add the text, or remove the message.",
        ),
        (
            {"messages": ["hi"]},
            "message 1 must be an object like {'role': ..., 'content': ...}, got text.",
        ),
    ],
)
def test_openai_row_errors(row, expected):
    assert row_error(row, "openai") == expected


def test_sharegpt_unknown_role_lists_sharegpt_roles():
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "x"}]}
    assert row_error(row, "sharegpt").startswith(
        "message 2 has unknown role 'bot'. Expected one of: 'human', 'gpt', 'system', 'function_call', "
        "'observation', 'user', 'assistant', 'tool'"
    )


# ---------------------------------------------------------------- text


def test_text_format():
    assert row_to_example({"text": "Once upon a time."}, "text", ColumnMap()) == Example(text="Once upon a time.")
    assert row_to_example({"body": "x"}, "text", ColumnMap(text="body")) == Example(text="x")
    assert row_error({"text": ""}, "text") == "'text' is empty. Write the text, or delete the row."
    assert row_error({"text": 3}, "text").startswith("'text' must be text, got a number (3)")


def test_unknown_format():
    with pytest.raises(DataError, match=r"Unknown dataset format 'chatml'\. Choose one of: alpaca, sharegpt"):
        row_to_example({}, "chatml", ColumnMap())
