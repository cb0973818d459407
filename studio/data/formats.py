"""Dataset formats: a row of a file -> an Example (a list of messages, or a plain text).

Pure functions over one row, so each format rule is testable on a single dict. The formats:
- alpaca:   {"instruction", "input" (optional), "output", "system" (optional), "history" (optional)}
- sharegpt: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "system" (optional)}
- openai:   {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}
- text:     {"text": ...}
Both message formats may carry tool calling (studio.data.tools): a "tools" column of schemas, assistant
calls (openai `tool_calls`, sharegpt `function_call` turns) and their results (`tool` / `observation`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from studio.data.errors import DataError, RowError
from studio.data.tools import (
    ToolCall,
    calls_text,
    check_calls_declared,
    parse_function_call,
    parse_openai_calls,
    parse_tools,
)

FORMATS = ("alpaca", "sharegpt", "openai", "text")
ROLES = ("system", "user", "assistant", "tool")
FUNCTION_CALL = "function_call"  # the sharegpt role of a call turn; it becomes an assistant message with calls

# The column names each format uses unless a ColumnMap says otherwise.
_DEFAULTS: dict[str, dict[str, str]] = {
    "alpaca": {
        "instruction": "instruction",
        "input": "input",
        "output": "output",
        "system": "system",
        "history": "history",
    },
    "sharegpt": {
        "messages": "conversations",
        "system": "system",
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        "system_tag": "system",
        "function_tag": "function_call",
        "observation_tag": "observation",
        "tools": "tools",
    },
    "openai": {
        "messages": "messages",
        "system": "system",
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
        "tools": "tools",
    },
    "text": {"text": "text"},
}

# Columns a file must have for each format (canonical field names).
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "sharegpt": ("messages",),
    "openai": ("messages",),
    "text": ("text",),
}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise DataError(f"Unknown dataset format {fmt!r}. Choose one of: {', '.join(FORMATS)}.")
    return fmt


def check_column_names(column_map: Any) -> None:
    """Every set entry of a column-map dataclass is a non-empty column name."""
    for f in fields(column_map):
        value = getattr(column_map, f.name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise DataError(
                f"Column map entry {f.name!r} must be a non-empty column name, got {value!r}. "
                "Give the name of the column in your file, or leave it out to use the usual name."
            )


@dataclass(frozen=True)
class ColumnMap:
    """Canonical field -> the name used in the file. None means "the format's usual name".

    Tags name the keys and role values inside a message list (sharegpt/openai). `system` is a
    column holding a system prompt (alpaca, and optionally sharegpt/openai).
    """

    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    system: str | None = None
    history: str | None = None
    messages: str | None = None
    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str | None = None
    assistant_tag: str | None = None
    system_tag: str | None = None
    function_tag: str | None = None  # sharegpt: the role value of a tool-call turn
    observation_tag: str | None = None  # sharegpt: the role value of a tool-result turn
    tools: str | None = None  # the column of tool schemas (JSON)
    text: str | None = None

    def __post_init__(self) -> None:
        check_column_names(self)

    def name(self, field: str, fmt: str) -> str:
        """The file's name for `field` under format `fmt`."""
        value = getattr(self, field)
        return value if value is not None else _DEFAULTS[fmt].get(field, field)

    def resolve(self, fmt: str) -> ColumnMap:
        """A copy with the format's usual names filled in for every field the format uses."""
        check_format(fmt)
        return replace(self, **{k: self.name(k, fmt) for k in _DEFAULTS[fmt]})

    def to_dict(self) -> dict[str, str]:
        """Only the fields set explicitly: a stored map stays readable and format-neutral."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ColumnMap:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataError(f"Unknown column map keys: {', '.join(unknown)}. Allowed keys: {', '.join(sorted(known))}.")
        return cls(**data)


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant messages only; their content may then be empty

    @property
    def shown(self) -> str:
        """The text with the calls written out: what checks and statistics read."""
        return calls_text(self.content, self.tool_calls) if self.tool_calls else self.content


@dataclass(frozen=True)
class Example:
    """One training example: a conversation, or (plain-text format only) a text."""

    messages: tuple[Message, ...] = ()
    text: str | None = None
    tools: str | None = None  # the tool schemas the conversation offers, as JSON (studio.data.tools)


def openai_messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """Messages as chat templates read them (OpenAI's form, tool calls included)."""
    out = []
    for m in messages:
        turn: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            turn["tool_calls"] = [call.to_openai() for call in m.tool_calls]
        out.append(turn)
    return out


# ---------------------------------------------------------------- detection


def detect_format(rows: list[dict]) -> str:
    """Guess the format from the column names (and, for message lists, the keys of the first message)."""
    columns = _columns(rows)
    for col in ("conversations", "messages"):
        if col in columns:
            keys = _first_message_keys(rows, col)
            if {"from", "value"} <= keys:
                return "sharegpt"
            if {"role", "content"} <= keys:
                return "openai"
            return "sharegpt" if col == "conversations" else "openai"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    seen = ", ".join(columns) or "none"
    raise DataError(
        f"Could not tell the dataset format. Columns seen: {seen}. Expected: alpaca needs 'instruction' "
        "and 'output' (optional 'input', 'system', 'history'); sharegpt needs 'conversations' "
        "([{from, value}]); openai needs 'messages' ([{role, content}]); text needs 'text'. Rename the "
        'columns, or choose the format and give a column map (e.g. {"output": "answer"}).'
    )


def guess_column_map(rows: list[dict], fmt: str) -> ColumnMap:
    """The column map for the usual variants: a message list under either name, with either tag set."""
    check_format(fmt)
    if fmt not in ("sharegpt", "openai"):
        return ColumnMap()
    columns = _columns(rows)
    default_col = _DEFAULTS[fmt]["messages"]
    other_col = "messages" if default_col == "conversations" else "conversations"
    col = other_col if default_col not in columns and other_col in columns else default_col
    keys = _first_message_keys(rows, col)
    overrides: dict[str, str] = {}
    if col != default_col:
        overrides["messages"] = col
    if fmt == "sharegpt" and {"role", "content"} <= keys:
        overrides.update(role_tag="role", content_tag="content")
    if fmt == "openai" and {"from", "value"} <= keys:
        overrides.update(role_tag="from", content_tag="value")
    return ColumnMap(**overrides)


def _columns(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _first_message_keys(rows: list[dict], col: str) -> set[str]:
    for row in rows[:50]:
        value = row.get(col)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return {k for k, v in value[0].items() if v is not None}
    return set()


# ---------------------------------------------------------------- row -> example


def row_to_example(row: dict, fmt: str, cmap: ColumnMap) -> Example:
    """Turn one row into an Example, or raise RowError saying what is wrong with it."""
    check_format(fmt)
    if fmt == "alpaca":
        return _alpaca(row, cmap)
    if fmt == "text":
        return Example(text=_text_field(row, cmap.name("text", fmt), required=True))
    return _chat(row, fmt, cmap)


def _alpaca(row: dict, cmap: ColumnMap) -> Example:
    instruction = _text_field(row, cmap.name("instruction", "alpaca"), required=False)
    query = _text_field(row, cmap.name("input", "alpaca"), required=False)
    output_col = cmap.name("output", "alpaca")
    output = _text_field(row, output_col, required=True)
    if not instruction.strip() and not query.strip():
        raise RowError(
            f"'{cmap.name('instruction', 'alpaca')}' is empty or missing: the row has an answer but no "
            "question. Write the instruction, or delete the row."
        )
    system = _text_field(row, cmap.name("system", "alpaca"), required=False)
    history = _history(row.get(cmap.name("history", "alpaca")), cmap.name("history", "alpaca"))

    if instruction.strip() and query.strip():
        user = instruction + "\n\n" + query
    else:
        user = instruction if instruction.strip() else query
    messages: list[Message] = [Message("system", system)] if system.strip() else []
    for question, answer in history:
        messages += [Message("user", question), Message("assistant", answer)]
    messages += [Message("user", user), Message("assistant", output)]
    return Example(messages=tuple(messages))


def _history(value: Any, col: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowError(
            f"'{col}' must be a list of [question, answer] pairs, got {_kind(value)}. Write it like "
            '[["Hi", "Hello!"]], or leave it empty.'
        )
    pairs = []
    for i, pair in enumerate(value, start=1):
        ok = isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        if not ok:
            raise RowError(
                f"'{col}' entry {i} must be a [question, answer] pair of two texts, got {_short(pair)}. "
                'Write it like ["Hi", "Hello!"].'
            )
        if not pair[0].strip() or not pair[1].strip():
            raise RowError(f"'{col}' entry {i} has an empty question or answer. Fill it in or remove the pair.")
        pairs.append((pair[0], pair[1]))
    return pairs


def _chat(row: dict, fmt: str, cmap: ColumnMap) -> Example:
    col = cmap.name("messages", fmt)
    value = row.get(col)
    if value is None:
        raise RowError(f"'{col}' is missing. Every {fmt} row needs a list of messages in '{col}'.")
    if not isinstance(value, list):
        hint = " (CSV cannot hold lists: use JSON Lines)" if isinstance(value, str) else ""
        raise RowError(f"'{col}' must be a list of messages, got {_kind(value)}{hint}.")
    if not value:
        raise RowError(f"'{col}' is an empty conversation. Add at least a user and an assistant message.")

    role_tag, content_tag = cmap.name("role_tag", fmt), cmap.name("content_tag", fmt)
    role_names = {
        cmap.name("user_tag", fmt): "user",
        cmap.name("assistant_tag", fmt): "assistant",
        cmap.name("system_tag", fmt): "system",
    }
    if fmt == "sharegpt":  # LLaMA-Factory's tool turns, and the openai role names files in the wild use
        role_names[cmap.name("function_tag", fmt)] = FUNCTION_CALL
        role_names[cmap.name("observation_tag", fmt)] = "tool"
        for role in ROLES:
            role_names.setdefault(role, role)
    else:
        role_names.setdefault("tool", "tool")

    tools_col = cmap.name("tools", fmt)
    tools = parse_tools(row.get(tools_col), tools_col)
    messages: list[Message] = []
    system = _text_field(row, cmap.name("system", fmt), required=False)
    if system.strip():
        messages.append(Message("system", system))
    for i, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise RowError(
                f"message {i} must be an object like {{{role_tag!r}: ..., {content_tag!r}: ...}}, got {_kind(item)}."
            )
        role_value = item.get(role_tag)
        if role_value is None:
            raise RowError(f"message {i} has no '{role_tag}'. Say who speaks: {_role_list(role_names)}.")
        role = role_names.get(role_value) if isinstance(role_value, str) else None
        if role is None:
            raise RowError(
                f"message {i} has unknown role {_short(role_value)}. Expected one of: {_role_list(role_names)}."
            )
        message = _message(item, role, i, content_tag, tools)
        if role == "system" and messages:
            raise RowError(
                f"message {i} (system): a system message may only come first. Move it to the start, or remove it."
            )
        messages.append(message)
    _check_turns(messages)
    return Example(messages=tuple(messages), tools=tools)


def _message(item: dict, role: str, i: int, content_tag: str, tools: str | None) -> Message:
    """One message of a list; tool calls (openai `tool_calls`, a sharegpt function_call turn) are checked
    against the row's tools, tool results may be JSON objects (they are written as JSON text)."""
    content = item.get(content_tag)
    where = f"message {i} ({'assistant call' if role == FUNCTION_CALL else role})"
    if role == FUNCTION_CALL:
        if content is None or content == "":
            raise RowError(f"{where} has no '{content_tag}'. Write the call as JSON, or remove the message.")
        calls = parse_function_call(content, where)
        check_calls_declared(calls, tools, where)
        return Message("assistant", "", calls)
    calls: tuple[ToolCall, ...] = ()
    if role == "assistant" and item.get("tool_calls"):
        calls = parse_openai_calls(item["tool_calls"], where)
        check_calls_declared(calls, tools, where)
        if content is None:
            content = ""
    if role == "tool" and isinstance(content, dict | list):
        content = json.dumps(content, ensure_ascii=False)
    if content is None:
        raise RowError(f"{where} has no '{content_tag}'. Add the text, or remove the message.")
    if not isinstance(content, str):
        raise RowError(f"{where}: '{content_tag}' must be text, got {_kind(content)}{_quote_hint(content)}.")
    if not content.strip() and not calls:
        raise RowError(f"{where} is empty. Write the text, or remove the message.")
    return Message(role, content, calls)


def _check_turns(messages: list[Message]) -> None:
    """user/assistant alternate after an optional leading system message, ending with the assistant. With
    tools: an assistant's calls are followed by one tool result each (or end the conversation), and the
    assistant speaks again after the results."""
    turns = messages[1:] if messages and messages[0].role == "system" else messages
    if not turns:
        raise RowError("the conversation has only a system message. Add a user and an assistant message.")
    offset = len(messages) - len(turns)
    prev: Message | None = None
    for i, msg in enumerate(turns):
        number = i + 1 + offset
        if msg.role == "tool":
            if prev is None or not (prev.role == "tool" or prev.tool_calls):
                raise RowError(
                    f"message {number} is a tool result with no call before it. Put it right after the "
                    "assistant's tool call, or remove it."
                )
        elif prev is not None and prev.tool_calls and msg.role != "tool":
            raise RowError(
                f"message {number - 1} calls a tool but no tool result follows it. Add the result (a tool or "
                "observation message) after the call, or end the conversation with the call."
            )
        else:
            expected = "assistant" if prev is not None and prev.role in ("user", "tool") else "user"
            if msg.role != expected:
                raise RowError(
                    f"message {number} is from {msg.role} but {expected} was expected: user and "
                    "assistant turns must alternate, starting with user. Merge or remove the extra message."
                )
        prev = msg
    if turns[-1].role == "tool":
        raise RowError(
            "the conversation ends with a tool result. The last message must be the assistant's: add the answer "
            "it gives with the result, or remove the result."
        )
    if turns[-1].role != "assistant":
        raise RowError(
            "the conversation ends with a user message. The last message must be the assistant's answer: "
            "add it, or remove the final user message."
        )


def _text_field(row: dict, col: str, required: bool) -> str:
    value = row.get(col)
    if value is None:
        if required:
            raise RowError(f"'{col}' is missing (no value). Fill it in, or delete the row.")
        return ""
    if not isinstance(value, str):
        raise RowError(f"'{col}' must be text, got {_kind(value)}{_quote_hint(value)}.")
    if required and not value.strip():
        raise RowError(f"'{col}' is empty. Write the text, or delete the row.")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, dict):
        return "an object ({...})"
    if isinstance(value, list):
        return "a list ([...])"
    if isinstance(value, str):
        return "text"
    return type(value).__name__


def _quote_hint(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return ': put it in quotes to make it text, e.g. "42"'
    if isinstance(value, dict | list):
        return ": write the text itself, not a nested structure"
    return ""


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _role_list(role_names: dict[str, str]) -> str:
    return ", ".join(repr(k) for k in role_names)
