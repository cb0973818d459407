"""Preference data: a row of a file -> a pair (prompt, chosen, rejected) or a labelled completion (KTO).

Pure functions over one row, like `formats`, so each shape is testable on a single dict. Pairwise shapes:
- plain:       {"prompt": str, "chosen": str, "rejected": str, "system" (optional)}
- alpaca:      {"instruction", "input" (optional), "chosen", "rejected", "system", "history" (optional)}
- messages:    {"prompt": [messages] (optional), "chosen": [messages], "rejected": [messages]} (TRL's
               conversational form; without "prompt", both sides are whole conversations whose turns
               before the last answer are the prompt, and must be the same on both sides)
- ranking:     LLaMA-Factory's `ranking: true` sharegpt entries: {"conversations": [turns ending with the
               user], "chosen": {"from": "gpt", "value": ...}, "rejected": {...}} (or openai "messages")
Unpaired (KTO) shapes, a completion and whether it is desirable:
- plain:       {"prompt": str or [messages], "completion": str or [messages], "label": bool}
- tagged:      {"conversations" or "messages": [turns ending with the answer], "kto_tag" or "label": bool}
               (LLaMA-Factory's `kto_tag`)
Message items are {"role", "content"} or {"from", "value"}; roles user/human, assistant/gpt, system.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any

from studio.core.problems import Severity
from studio.data.errors import DataError, RowError, RowIssue
from studio.data.formats import Message, check_column_names
from studio.data.validate import ValidationReport

PREFERENCE_FORMATS = ("preference", "kto")
_ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_MESSAGE_KEYS = (("role", "content"), ("from", "value"))
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


@dataclass(frozen=True)
class PreferenceColumns:
    """The file's column for each field a preference row reads, where it is not the usual name (the column
    map of a preference dataset; LLaMA-Factory's `columns`). `label` also reads `kto_tag`, `messages`
    also reads `conversations`."""

    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: str | None = None
    instruction: str | None = None
    input: str | None = None
    system: str | None = None
    history: str | None = None
    messages: str | None = None

    def __post_init__(self) -> None:
        check_column_names(self)

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PreferenceColumns:
        data = dict(data or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise DataError(
                f"Unknown column map keys for preference data: {', '.join(unknown)}. Allowed: {', '.join(known)}."
            )
        return cls(**data)

    def apply(self, row: dict) -> dict:
        """The row under the usual names: each mapped column renamed to its field."""
        mapped = self.to_dict()
        if not mapped:
            return row
        out = {k: v for k, v in row.items() if k not in mapped.values()}
        out.update({name: row.get(col) for name, col in mapped.items()})
        return out


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (ending with the user's turn) and two answers to it, the chosen one better."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str

    def to_trl(self) -> dict[str, list[dict[str, str]]]:
        """TRL's conversational preference row: the chat template renders the prompt for both sides."""
        return {
            "prompt": [{"role": m.role, "content": m.content} for m in self.prompt],
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


@dataclass(frozen=True)
class LabeledCompletion:
    """A prompt and one answer, marked desirable or not (KTO's unpaired data)."""

    prompt: tuple[Message, ...]
    completion: str
    desirable: bool

    def to_trl(self) -> dict[str, Any]:
        return {
            "prompt": [{"role": m.role, "content": m.content} for m in self.prompt],
            "completion": [{"role": "assistant", "content": self.completion}],
            "label": self.desirable,
        }


# ---------------------------------------------------------------- detection


def detect_preference_format(columns: list[str] | set[str]) -> str | None:
    """'preference' for pairwise columns, 'kto' for labelled completions, None for neither (SFT data)."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if "kto_tag" in cols or ("label" in cols and ({"completion", "messages", "conversations"} & cols)):
        return "kto"
    return None


# ---------------------------------------------------------------- row -> pair / labelled completion


def row_to_pair(row: dict) -> PreferencePair:
    """One pairwise row as a PreferencePair, or RowError saying what is wrong with it."""
    for side in ("chosen", "rejected"):
        if row.get(side) is None:
            raise RowError(f"'{side}' is missing. Every preference row needs both a 'chosen' and a 'rejected' answer.")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen_text, rejected_text = _conversation_sides(row, chosen, rejected)
    else:
        prompt = _prompt_of(row)
        chosen_text, rejected_text = _answer(chosen, "chosen"), _answer(rejected, "rejected")
    if _flat(chosen_text) == _flat(rejected_text):
        raise RowError(
            "'chosen' and 'rejected' are the same answer: the pair teaches nothing. Write a worse rejected "
            "answer, or delete the row."
        )
    return PreferencePair(prompt, chosen_text, rejected_text)


def row_to_labeled(row: dict) -> LabeledCompletion:
    """One KTO row as a LabeledCompletion, or RowError saying what is wrong with it."""
    tag = "kto_tag" if "kto_tag" in row else "label"
    desirable = parse_label(row.get(tag), tag)
    if row.get("completion") is not None:
        prompt = _prompt_of(row)
        completion = row["completion"]
        text = _answer(completion[-1] if isinstance(completion, list) and completion else completion, "completion")
        return LabeledCompletion(prompt, text, desirable)
    col = "conversations" if row.get("conversations") is not None else "messages"
    turns = _messages(row.get(col), col, _system(row))
    if turns[-1].role != "assistant":
        raise RowError(f"'{col}' must end with the assistant's answer: that answer is what the label judges.")
    return LabeledCompletion(turns[:-1], turns[-1].content, desirable)


def parse_label(value: Any, col: str = "label") -> bool:
    """A KTO label: a JSON boolean, or true/false (yes/no, 1/0) as text, which is all a CSV can hold."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    if value is None:
        raise RowError(f"'{col}' is missing. Mark each answer true (desirable) or false (undesirable).")
    raise RowError(f"'{col}' must be true or false, got {value!r}. Mark the answer true (desirable) or false.")


def _conversation_sides(row: dict, chosen: list, rejected: list) -> tuple[tuple[Message, ...], str, str]:
    """Message-list sides: with a 'prompt' column each side is the answer; without, each side is a whole
    conversation and the turns before its last answer, the same on both sides, are the prompt."""
    if row.get("prompt") is not None:
        prompt = _prompt_of(row)
        return prompt, _last_answer(chosen, "chosen"), _last_answer(rejected, "rejected")
    system = _system(row)
    chosen_turns = _messages(chosen, "chosen", system)
    rejected_turns = _messages(rejected, "rejected", system)
    for side, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
        if turns[-1].role != "assistant":
            raise RowError(f"'{side}' must end with the assistant's answer.")
    if chosen_turns[:-1] != rejected_turns[:-1]:
        raise RowError(
            "the prompt differs between 'chosen' and 'rejected': both conversations must be the same up to "
            "the last answer, so only the answers are compared. Make the earlier turns identical."
        )
    return chosen_turns[:-1], chosen_turns[-1].content, rejected_turns[-1].content


def _prompt_of(row: dict) -> tuple[Message, ...]:
    """The prompt of a row whose answers are given apart: a 'prompt' text or message list, alpaca's
    instruction/input/history, or a ranking entry's conversation ending with the user's turn."""
    system = _system(row)
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        turns = _messages(prompt, "prompt", system)
    elif prompt is not None:
        turns = (*system, Message("user", _text(prompt, "prompt")))
    elif row.get("instruction") is not None or row.get("input") is not None:
        turns = _alpaca_prompt(row, system)
    elif row.get("conversations") is not None or row.get("messages") is not None:
        col = "conversations" if row.get("conversations") is not None else "messages"
        turns = _messages(row[col], col, system)
    else:
        raise RowError(
            "the row has no prompt: give a 'prompt' (text or messages), alpaca's 'instruction', or the "
            "conversation so far in 'conversations' / 'messages'."
        )
    if turns[-1].role != "user":
        raise RowError("the prompt must end with the user's turn: the two answers reply to it.")
    return turns


def _alpaca_prompt(row: dict, system: tuple[Message, ...]) -> tuple[Message, ...]:
    instruction = _optional_text(row, "instruction")
    query = _optional_text(row, "input")
    if not instruction.strip() and not query.strip():
        raise RowError("'instruction' is empty: the row has answers but no question. Write it, or delete the row.")
    user = f"{instruction}\n\n{query}" if instruction.strip() and query.strip() else (instruction or query)
    turns = list(system)
    for i, pair in enumerate(row.get("history") or [], start=1):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise RowError(f"'history' entry {i} must be a [question, answer] pair of two texts.")
        turns += [Message("user", pair[0]), Message("assistant", pair[1])]
    return (*turns, Message("user", user))


def _messages(value: Any, col: str, system: tuple[Message, ...] = ()) -> tuple[Message, ...]:
    """A list of {role, content} or {from, value} items as messages, turns alternating from the user."""
    if not isinstance(value, list) or not value:
        hint = " (CSV cannot hold lists: use JSON Lines)" if isinstance(value, str) else ""
        raise RowError(f"'{col}' must be a non-empty list of messages{hint}.")
    messages = list(system)
    for i, item in enumerate(value, start=1):
        role, content = _message(item, f"'{col}' message {i}")
        if role == "system":
            if messages:
                raise RowError(f"'{col}' message {i}: a system message may only come first.")
        elif role != ("user" if sum(m.role != "system" for m in messages) % 2 == 0 else "assistant"):
            raise RowError(f"'{col}' message {i} is from {role}: user and assistant turns must alternate, user first.")
        messages.append(Message(role, content))
    if all(m.role == "system" for m in messages):
        raise RowError(f"'{col}' has only a system message. Add the user's turn.")
    return tuple(messages)


def _message(item: Any, where: str) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise RowError(f"{where} must be an object like {{'role': ..., 'content': ...}}.")
    for role_key, content_key in _MESSAGE_KEYS:
        if role_key in item:
            role = _ROLE_NAMES.get(item[role_key]) if isinstance(item[role_key], str) else None
            if role is None:
                raise RowError(
                    f"{where} has role {item[role_key]!r}; expected user/human, assistant/gpt or system "
                    "(tool turns belong to tool-calling data, not to preference pairs)."
                )
            return role, _text(item.get(content_key), f"{where} '{content_key}'")
    raise RowError(f"{where} has neither 'role' nor 'from'. Say who speaks.")


def _last_answer(value: list, side: str) -> str:
    """The answer of a message-list side given with a separate prompt: its last (assistant) message."""
    role, content = _message(value[-1], f"'{side}' message {len(value)}") if value else ("", "")
    if role != "assistant":
        raise RowError(f"'{side}' must hold the assistant's answer (got a {role or 'empty'} message).")
    return content


def _answer(value: Any, side: str) -> str:
    """An answer given as text, or as one message object (a ranking entry's {"from": "gpt", "value": ...})."""
    if isinstance(value, dict):
        role, content = _message(value, f"'{side}'")
        if role != "assistant":
            raise RowError(f"'{side}' must be the assistant's answer, not a {role} message.")
        return content
    return _text(value, side)


def _flat(text: str) -> str:
    return " ".join(text.casefold().split())


def _system(row: dict) -> tuple[Message, ...]:
    system = _optional_text(row, "system")
    return (Message("system", system),) if system.strip() else ()


def _optional_text(row: dict, col: str) -> str:
    value = row.get(col)
    return "" if value is None else _text(value, col, allow_empty=True)


def _text(value: Any, col: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowError(f"{col} must be text, got {type(value).__name__}.")
    if not allow_empty and not value.strip():
        raise RowError(
            f"{col} is empty: both sides of a pair, and every turn, need text. Fill it in or delete the row."
        )
    return value


# ---------------------------------------------------------------- the whole file


def validate_preference_rows(
    rows: list[dict], fmt: str, columns: PreferenceColumns | None = None, skip_invalid: bool = False
) -> ValidationReport:
    """Check every row as `fmt` ('preference' or 'kto'); bad rows are skipped (warnings) if skip_invalid.
    The report's examples are PreferencePair / LabeledCompletion items. KTO data needs both labels: with one
    class there is nothing to contrast."""
    if fmt not in PREFERENCE_FORMATS:
        raise ValueError(f"not a preference format: {fmt!r}")
    parse = row_to_pair if fmt == "preference" else row_to_labeled
    columns = columns or PreferenceColumns()
    report = ValidationReport(examples=[], kept_rows=[], total_rows=len(rows))
    if not rows:
        report.issues.append(RowIssue(0, "the file has no rows. Add at least one row."))
        return report
    severity = Severity.WARNING if skip_invalid else Severity.ERROR
    for number, row in enumerate(rows, start=1):
        try:
            item = parse(columns.apply(row))
        except RowError as err:
            report.issues.append(RowIssue(number, str(err), severity))
            continue
        report.examples.append(item)
        report.kept_rows.append(number)
    if fmt == "kto" and report.examples:
        labels = Counter(item.desirable for item in report.examples)
        if len(labels) == 1:
            only = "desirable (true)" if True in labels else "undesirable (false)"
            report.issues.append(
                RowIssue(
                    0,
                    f"every answer is labelled {only}: KTO learns from the contrast, so it needs both kinds. "
                    "Add answers with the other label (a few are enough: KTO weighs the classes).",
                )
            )
    return report
