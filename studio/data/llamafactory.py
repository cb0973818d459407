"""LLaMA-Factory's dataset_info.json: map its entries onto our formats, and import a whole file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.data.errors import DataError
from studio.data.formats import ColumnMap
from studio.data.preference import PreferenceColumns

if TYPE_CHECKING:
    from studio.data.registry import DatasetRegistry

# Entries that live on a hub or in the cloud: not reachable offline.
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
# Columns for data we do not train on yet (multimodal).
UNSUPPORTED_COLUMNS = ("images", "videos", "audios")
PREFERENCE_KEYS = ("chosen", "rejected", "kto_tag")  # LLaMA-Factory's columns of ranking and KTO entries
ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": "history",
    "system": "system",
}
SHAREGPT_COLUMNS = {"messages": "messages", "system": "system", "tools": "tools"}
TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag", "function_tag", "observation_tag")
# LLaMA-Factory's defaults for sharegpt; tags equal to OPENAI_TAGS mean "openai messages".
SHAREGPT_DEFAULTS = {
    "messages": "conversations",
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
    "function_tag": "function_call",
    "observation_tag": "observation",
}
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
}


@dataclass
class ImportReport:
    registered: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def summary(self) -> str:
        parts = [f"{len(self.registered)} registered" + (f" ({', '.join(self.registered)})" if self.registered else "")]
        parts += [f"skipped '{name}': {reason}" for name, reason in self.skipped]
        return "; ".join(parts) + "."


def map_entry(spec: dict[str, Any]) -> tuple[str, ColumnMap | PreferenceColumns]:
    """(format, column map) for one dataset_info entry; DataError with the reason if we cannot use it.
    Ranking entries map to 'preference', entries with a kto_tag column to 'kto'."""
    if not isinstance(spec, dict):
        raise DataError("the entry is not an object with 'file_name', 'formatting', 'columns'.")
    hub = [k for k in HUB_KEYS if spec.get(k)]
    if hub:
        raise DataError(
            f"it is fetched from a hub or the cloud ({hub[0]}), which is not reachable offline. "
            "Download the file and point 'file_name' at it."
        )
    formatting = spec.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"formatting {formatting!r} is not supported; use 'alpaca' or 'sharegpt'.")
    columns = spec.get("columns") or {}
    tags = spec.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise DataError("'columns' and 'tags' must be objects mapping names to column names.")
    unsupported = [c for c in UNSUPPORTED_COLUMNS if columns.get(c)]
    if unsupported:
        raise DataError(f"it uses the column(s) {', '.join(unsupported)}: images, audio and video are not supported.")
    known = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    unknown = sorted(set(columns) - set(known) - set(UNSUPPORTED_COLUMNS) - set(PREFERENCE_KEYS))
    if unknown:
        raise DataError(
            f"unknown column key(s) for {formatting}: {', '.join(unknown)}; expected some of {', '.join(known)}."
        )

    if spec.get("ranking") or columns.get("kto_tag"):
        return _preference_entry(spec, formatting, columns, tags)
    if formatting == "alpaca":
        if set(columns) == {"prompt"}:  # LLaMA-Factory's pre-training entries: one text column
            return "text", ColumnMap(text=columns["prompt"])
        return "alpaca", ColumnMap(**{ALPACA_COLUMNS[k]: v for k, v in columns.items() if v})

    resolved = {**SHAREGPT_DEFAULTS, **{k: v for k, v in tags.items() if k in TAGS and v}}
    messages = columns.get("messages") or SHAREGPT_DEFAULTS["messages"]
    system = columns.get("system")
    tools = columns.get("tools") if columns.get("tools") != "tools" else None
    if all(resolved[k] == v for k, v in OPENAI_TAGS.items()):
        return "openai", ColumnMap(messages=None if messages == "messages" else messages, system=system, tools=tools)
    return "sharegpt", ColumnMap(
        messages=None if messages == "conversations" else messages,
        system=system,
        tools=tools,
        **{k: resolved[k] for k in TAGS if resolved[k] != SHAREGPT_DEFAULTS[k]},
    )


def _preference_entry(
    spec: dict[str, Any], formatting: str, columns: dict[str, str], tags: dict[str, str]
) -> tuple[str, PreferenceColumns]:
    """A ranking entry ('preference': chosen and rejected) or a KTO one ('kto': a kto_tag column)."""
    fmt = "preference" if spec.get("ranking") else "kto"
    odd = {k: v for k, v in tags.items() if k in TAGS and v not in (SHAREGPT_DEFAULTS[k], OPENAI_TAGS.get(k))}
    if odd:
        shown = ", ".join(f"{k}={v!r}" for k, v in odd.items())
        raise DataError(
            f"its tags ({shown}) are not the usual sharegpt or openai names, which preference data needs; "
            "rename them in the file (from/value with human/gpt, or role/content with user/assistant)."
        )
    names = {"chosen": "chosen", "rejected": "rejected", "kto_tag": "label", "system": "system"}
    names.update(ALPACA_COLUMNS if formatting == "alpaca" else {"messages": "messages"})
    if fmt == "preference" and columns.get("response"):
        raise DataError("a ranking entry has no 'response' column: its answers are 'chosen' and 'rejected'.")
    names["response"] = "completion"  # an alpaca KTO entry: the judged answer
    mapped = {names[k]: v for k, v in columns.items() if v and k in names}
    if fmt == "kto" and formatting == "alpaca":
        mapped.setdefault("completion", "output")  # LLaMA-Factory's usual name for the answer
    usual = {"messages": "conversations", "label": "kto_tag"}
    # a column already under its usual name needs no entry (the parser reads kto_tag and conversations too)
    mapped = {k: v for k, v in mapped.items() if v not in (k, usual.get(k))}
    return fmt, PreferenceColumns(**mapped)


def read_dataset_info(info_path: Path) -> dict[str, Any]:
    info_path = Path(info_path)
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{info_path} does not exist. Give the path of a LLaMA-Factory dataset_info.json.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{info_path} is not valid UTF-8 JSON ({e}). Fix the file and try again.") from None
    if not isinstance(info, dict):
        raise DataError(f"{info_path} must hold a JSON object of dataset name -> entry.")
    return info


def import_dataset_info(registry: DatasetRegistry, info_path: Path, skip_invalid: bool = False) -> ImportReport:
    """Register every usable entry of a dataset_info.json; say why each other one was skipped."""
    info_path = Path(info_path)
    report = ImportReport()
    for name, spec in read_dataset_info(info_path).items():
        try:
            fmt, cmap = map_entry(spec)
            file_name = spec.get("file_name")
            if not file_name:
                raise DataError("it has no 'file_name'.")
            source = info_path.parent / file_name
            if not source.exists():
                raise DataError(f"its file {file_name!r} was not found next to {info_path.name}.")
            if source.is_dir():
                raise DataError(f"its file_name {file_name!r} is a folder; only single files are supported.")
            registry.add(
                name,
                source,
                fmt=fmt,
                column_map=cmap.to_dict(),
                skip_invalid=skip_invalid,
                description=f"Imported from {info_path}",
            )
        except DataError as e:
            report.skipped.append((name, str(e)))
        else:
            report.registered.append(name)
    return report
