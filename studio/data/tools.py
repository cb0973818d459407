"""Tool calling: the schemas a conversation offers, the calls the assistant makes, and how both are written
for a chat template that does not know tools.

Two dialects come in. OpenAI messages: a `tools` column of JSON schemas, assistant messages with
`tool_calls` ([{"type": "function", "function": {"name", "arguments"}}]) and `tool` messages with the
results. LLaMA-Factory's sharegpt: a `tools` column (a JSON text), `function_call` turns whose value is a
JSON {"name", "arguments"} (or a list of them) and `observation` turns. Both become the same structures:
schemas in OpenAI's {"type": "function", "function": {...}} form, ToolCall(name, arguments JSON text).

The fallback format (templates without tools, the bundled model's among them) is the Hermes one that
Qwen and NousResearch models use: the schemas go into the system turn inside <tools></tools>, each call is
a JSON object inside <tool_call></tool_call> in the assistant turn, each result is a user turn inside
<tool_response></tool_response>. A model trained on it calls tools the same way in the Chat tab.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from studio.data.errors import RowError

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_PREAMBLE = (
    "You may call one or more functions to assist with the user query. The function signatures are inside "
    "<tools></tools>:\n<tools>\n{schemas}\n</tools>\nTo call a function, answer with a JSON object "
    '{{"name": <function-name>, "arguments": <args-object>}} inside <tool_call></tool_call> tags.'
)
CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as compact text (hashable, and what the model is trained to write)

    def to_openai(self) -> dict[str, Any]:
        """The form chat templates read: arguments as an object."""
        return {"type": "function", "function": {"name": self.name, "arguments": json.loads(self.arguments)}}

    def text(self) -> str:
        """The call as the fallback format writes it."""
        body = json.dumps({"name": self.name, "arguments": json.loads(self.arguments)}, ensure_ascii=False)
        return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


# ---------------------------------------------------------------- schemas


def parse_tools(value: Any, col: str) -> str | None:
    """The tools column -> the schemas as canonical JSON text (a list of {"type": "function", ...}), None
    when the row offers none. RowError when the schemas are not valid JSON or not function schemas."""
    if value is None or (isinstance(value, str | list) and not value):
        return None
    example = 'list, e.g. [{"name": "get_weather", "description": "...", "parameters": {...}}]'
    value = _json(value, f"'{col}'", f"Write the tool schemas as a JSON {example}.")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(f"'{col}' must be a list of tool schemas, got {type(value).__name__}.")
    schemas = [_schema(item, i, col) for i, item in enumerate(value, start=1)]
    return json.dumps(schemas, ensure_ascii=False) if schemas else None


def _schema(item: Any, i: int, col: str) -> dict[str, Any]:
    function = item.get("function") if isinstance(item, dict) and item.get("type") == "function" else item
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
        raise RowError(
            f"'{col}' entry {i} is not a function schema: it needs at least a \"name\" (and usually "
            '"description" and "parameters"), e.g. {"name": "get_weather", "parameters": {"type": "object"}}.'
        )
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise RowError(f"'{col}' entry {i} ({function['name']}): \"parameters\" must be a JSON schema object.")
    return {"type": "function", "function": function}


def tool_names(tools: str | None) -> list[str]:
    return [schema["function"]["name"] for schema in json.loads(tools)] if tools else []


# ---------------------------------------------------------------- calls


def parse_openai_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's `tool_calls` list."""
    if not isinstance(value, list) or not value:
        raise RowError(f"{where}: 'tool_calls' must be a non-empty list of calls.")
    calls = []
    for i, item in enumerate(value, start=1):
        function = item.get("function", item) if isinstance(item, dict) else None
        calls.append(_call(function, f"{where}, call {i}"))
    return tuple(calls)


def parse_function_call(value: Any, where: str) -> tuple[ToolCall, ...]:
    """A sharegpt function_call turn: JSON text of {"name", "arguments"}, or of a list of them."""
    value = _json(value, where, 'Write the call as {"name": "...", "arguments": {...}}.')
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RowError(f"{where} is an empty list of calls.")
    return tuple(_call(item, where if len(items) == 1 else f"{where}, call {i}") for i, item in enumerate(items, 1))


def _json(value: Any, where: str, fix: str) -> Any:
    """A JSON text decoded (anything else as it is); RowError saying where and how to fix it."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RowError(f"{where} is not valid JSON ({e.msg} at character {e.pos}). {fix}") from None


def _call(function: Any, where: str) -> ToolCall:
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
        raise RowError(f'{where} has no function name: write it as {{"name": "...", "arguments": {{...}}}}.')
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise RowError(f"{where} ({function['name']}): the arguments are not valid JSON ({e.msg}).") from None
    if not isinstance(arguments, dict):
        raise RowError(f"{where} ({function['name']}): the arguments must be a JSON object of name -> value.")
    return ToolCall(function["name"], json.dumps(arguments, ensure_ascii=False))


def check_calls_declared(calls: tuple[ToolCall, ...], tools: str | None, where: str) -> None:
    """A call to a function the row does not offer is a typo the model would learn."""
    names = tool_names(tools)
    for call in calls:
        if names and call.name not in names:
            raise RowError(
                f"{where} calls {call.name!r}, which the row's tools do not declare ({', '.join(names)}). "
                "Fix the name, or add its schema to the tools."
            )


# ---------------------------------------------------------------- the fallback format


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template renders the `tools` it is given (it reads the variable); the others drop them."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def tools_system_text(tools: str, system: str = "") -> str:
    """The system turn of the fallback format: the user's system prompt, then the schemas."""
    schemas = "\n".join(json.dumps(schema, ensure_ascii=False) for schema in json.loads(tools))
    block = TOOLS_PREAMBLE.format(schemas=schemas)
    return f"{system.rstrip()}\n\n{block}" if system.strip() else block


def calls_text(content: str, calls: tuple[ToolCall, ...]) -> str:
    """An assistant turn of the fallback format: its text (if any), then each call."""
    parts = [content.strip()] if content.strip() else []
    return "\n".join(parts + [call.text() for call in calls])


def observation_text(contents: list[str]) -> str:
    """One user turn of the fallback format for the results of consecutive tool messages."""
    return "\n".join(f"<tool_response>\n{content}\n</tool_response>" for content in contents)


def calls_in_text(text: str) -> list[ToolCall]:
    """The calls a model wrote in the fallback format (the Chat tab shows them); malformed ones are skipped."""
    calls = []
    for body in CALL_RE.findall(text):
        try:
            calls.append(_call(json.loads(body), "call"))
        except (json.JSONDecodeError, RowError):
            continue
    return calls


def strip_calls(text: str) -> str:
    """The text around the calls of a fallback-format reply."""
    return CALL_RE.sub("", text).strip()
