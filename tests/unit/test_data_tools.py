"""Tool-calling data: both dialects parse to the same conversation, bad rows say what is wrong, calls are
trained and results masked, through a template that knows tools and through the fallback format."""

from __future__ import annotations

import json

import pytest

from studio.data.clean import CleanOptions, clean_examples
from studio.data.errors import RowError
from studio.data.formats import ColumnMap, Example, Message, row_to_example
from studio.data.llamafactory import map_entry
from studio.data.tokenize import build_sample, render_preview
from studio.data.tools import ToolCall, calls_in_text, parse_tools, template_knows_tools

FERRY = {
    "name": "get_ferry_schedule",
    "description": "Next ferry from a port.",
    "parameters": {"type": "object", "properties": {"port": {"type": "string"}}, "required": ["port"]},
}
RESULT = {"port": "Lisk", "next_departure": "14:30"}
CALL = ToolCall("get_ferry_schedule", '{"port": "Lisk"}')


def openai_row(**extra):
    return {
        "messages": [
            {"role": "user", "content": "Next ferry from Lisk?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_ferry_schedule", "arguments": '{"port": "Lisk"}'}}
                ],
            },
            {"role": "tool", "content": json.dumps(RESULT)},
            {"role": "assistant", "content": "It leaves at 14:30."},
        ],
        "tools": [FERRY],
        **extra,
    }


def sharegpt_row(tools=None, calls=None):
    return {
        "conversations": [
            {"from": "human", "value": "Next ferry from Lisk?"},
            {
                "from": "function_call",
                "value": calls or json.dumps({"name": "get_ferry_schedule", "arguments": {"port": "Lisk"}}),
            },
            {"from": "observation", "value": json.dumps(RESULT)},
            {"from": "gpt", "value": "It leaves at 14:30."},
        ],
        "tools": json.dumps([FERRY]) if tools is None else tools,
    }


EXPECTED = Example(
    messages=(
        Message("user", "Next ferry from Lisk?"),
        Message("assistant", "", (CALL,)),
        Message("tool", json.dumps(RESULT)),
        Message("assistant", "It leaves at 14:30."),
    ),
    tools=json.dumps([{"type": "function", "function": FERRY}]),
)


def test_openai_and_llamafactory_tool_rows_parse_to_the_same_conversation():
    assert row_to_example(openai_row(), "openai", ColumnMap()) == EXPECTED
    assert row_to_example(sharegpt_row(), "sharegpt", ColumnMap()) == EXPECTED
    # Schemas already in OpenAI's wrapped form, arguments as an object, a result as an object: the same.
    wrapped = openai_row(tools=[{"type": "function", "function": FERRY}])
    wrapped["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"port": "Lisk"}
    wrapped["messages"][2]["content"] = RESULT
    assert row_to_example(wrapped, "openai", ColumnMap()) == EXPECTED
    # Renamed tools column and tags, as a LLaMA-Factory entry would declare them.
    row = sharegpt_row()
    row["functions"] = row.pop("tools")
    for turn in row["conversations"]:
        turn["from"] = {"function_call": "call", "observation": "result"}.get(turn["from"], turn["from"])
    cmap = ColumnMap(tools="functions", function_tag="call", observation_tag="result")
    assert row_to_example(row, "sharegpt", cmap) == EXPECTED


def test_a_conversation_may_end_with_a_call_and_calls_may_come_in_parallel():
    row = sharegpt_row()
    row["conversations"] = row["conversations"][:2]
    assert row_to_example(row, "sharegpt", ColumnMap()).messages[-1].tool_calls == (CALL,)
    two = json.dumps([{"name": "get_ferry_schedule", "arguments": {"port": p}} for p in ("Lisk", "Hask")])
    row = sharegpt_row(calls=two)
    row["conversations"].insert(3, {"from": "observation", "value": "{}"})
    example = row_to_example(row, "sharegpt", ColumnMap())
    assert [c.arguments for c in example.messages[1].tool_calls] == ['{"port": "Lisk"}', '{"port": "Hask"}']


def _error(row, fmt="sharegpt") -> str:
    with pytest.raises(RowError) as info:
        row_to_example(row, fmt, ColumnMap())
    return str(info.value)


def test_bad_tool_rows_say_what_is_wrong():
    assert _error(sharegpt_row(tools="[{name: x}]")).startswith("'tools' is not valid JSON (Expecting property name")
    assert 'entry 1 is not a function schema: it needs at least a "name"' in _error(sharegpt_row(tools='[{"x": 1}]'))
    undeclared = json.dumps({"name": "get_weather", "arguments": {}})
    assert _error(sharegpt_row(calls=undeclared)) == (
        "message 2 (assistant call) calls 'get_weather', which the row's tools do not declare "
        "(get_ferry_schedule). Fix the name, or add its schema to the tools."
    )
    assert "the arguments are not valid JSON" in _error(
        sharegpt_row(calls='{"name": "get_ferry_schedule", "arguments": "{port"}')
    )
    assert "is not valid JSON" in _error(sharegpt_row(calls="get_ferry_schedule(Lisk)"))

    no_result = openai_row()
    del no_result["messages"][2]
    assert _error(no_result, "openai").startswith("message 2 calls a tool but no tool result follows it.")
    stray = openai_row()
    stray["messages"][1] = {"role": "assistant", "content": "Let me look."}
    assert _error(stray, "openai").startswith("message 3 is a tool result with no call before it.")
    ends = openai_row()
    del ends["messages"][3]
    assert _error(ends, "openai").startswith("the conversation ends with a tool result.")


def test_the_fallback_format_trains_the_calls_and_masks_the_results(tokenizer):
    assert not template_knows_tools(tokenizer.chat_template)  # the bundled model's template ignores tools
    spans = render_preview(tokenizer, build_sample(tokenizer, EXPECTED, 4096))
    trained = [text for text, on in spans if on]
    masked = "".join(text for text, on in spans if not on)
    assert trained == [
        '<tool_call>\n{"name": "get_ferry_schedule", "arguments": {"port": "Lisk"}}\n</tool_call><|im_end|>',
        "It leaves at 14:30.<|im_end|>",
    ]
    assert "<tools>\n" + json.dumps({"type": "function", "function": FERRY}) + "\n</tools>" in masked
    assert "<|im_start|>user\n<tool_response>\n" + json.dumps(RESULT) + "\n</tool_response><|im_end|>" in masked
    # What a model writes in that format is read back as calls (the Chat tab shows them).
    assert calls_in_text(trained[0]) == [CALL]
    assert calls_in_text("<tool_call>not json</tool_call> plain text") == []


NATIVE = (
    "{% if tools %}<|im_start|>system\nTOOLS {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_knows_tools_renders_them_itself(tokenizer):
    assert template_knows_tools(NATIVE)
    spans = render_preview(tokenizer, build_sample(tokenizer, EXPECTED, 4096, chat_template=NATIVE))
    assert [text for text, on in spans if on] == [
        'CALL get_ferry_schedule {"port": "Lisk"}<|im_end|>',
        "It leaves at 14:30.<|im_end|>",
    ]
    masked = "".join(text for text, on in spans if not on)
    assert masked.startswith('<|im_start|>system\nTOOLS [{"type": "function", "function": {"name": "get_ferry')
    assert "<|im_start|>tool\n" + json.dumps(RESULT) in masked and "<tool_call>" not in masked


def test_cleaning_keeps_calls_and_schemas():
    kept, report = clean_examples([EXPECTED, EXPECTED], CleanOptions(dedupe=True))
    assert kept == [EXPECTED] and report.dropped_duplicates == 1 and report.dropped_empty == 0
    assert parse_tools("", "tools") is None and parse_tools([], "tools") is None


def test_llamafactory_tool_entries_map_to_a_tools_column():
    assert map_entry({"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}) == (
        "sharegpt",
        ColumnMap(),
    )
    fmt, cmap = map_entry(
        {"formatting": "sharegpt", "columns": {"tools": "functions"}, "tags": {"function_tag": "call"}}
    )
    assert (fmt, cmap) == ("sharegpt", ColumnMap(tools="functions", function_tag="call"))


@pytest.mark.parametrize("template", [None, NATIVE], ids=["fallback", "native"])
def test_the_chat_prompt_is_written_as_training_writes_it(tokenizer, template):
    from studio.data.tokenize import render_prompt

    if template:
        tokenizer = copy_with_template(tokenizer, template)
    spans = render_preview(tokenizer, build_sample(tokenizer, EXPECTED, 4096))
    first_prompt = spans[0][0]
    assert (
        render_prompt(tokenizer, [{"role": "user", "content": "Next ferry from Lisk?"}], EXPECTED.tools) == first_prompt
    )
    # Later turns: the call as the model wrote it (fallback text) and the tool's result.
    written = '<tool_call>\n{"name": "get_ferry_schedule", "arguments": {"port": "Lisk"}}\n</tool_call>'
    turns = [
        {"role": "user", "content": "Next ferry from Lisk?"},
        {"role": "assistant", "content": written},
        {"role": "tool", "content": json.dumps(RESULT)},
    ]
    second_prompt = "".join(text for text, _ in spans[:3])
    assert render_prompt(tokenizer, turns, EXPECTED.tools) == second_prompt


def copy_with_template(tokenizer, template: str):
    import copy

    twin = copy.copy(tokenizer)
    twin.chat_template = template
    return twin
