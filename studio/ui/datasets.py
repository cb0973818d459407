"""The Datasets tab: check a file (upload or server path), preview it as the model sees it, register it,
and list / inspect / delete registered datasets.

The callbacks are module-level functions of plain widget values; `build` only wires them. Those that need
the workspace take `home` first and are bound with functools.partial.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from studio.core.problems import Severity
from studio.data import (
    FORMATS,
    CleanOptions,
    ColumnMap,
    DataError,
    DatasetRegistry,
    Example,
    Message,
    TokenStats,
    ValidationReport,
    build_sample,
    clean_examples,
    file_columns,
    guess_column_map,
    histogram,
    read_rows,
    render_preview,
    token_stats,
    validate_rows,
)
from studio.data.audit import (
    DoctorReport,
    apply_fixes,
    diagnose,
    fixable_kinds,
    free_name,
    row_numbers,
    rows_to_remove,
)
from studio.data.preference import (
    PREFERENCE_FORMATS,
    LabeledCompletion,
    PreferenceColumns,
    PreferencePair,
    validate_preference_rows,
)
from studio.data.registry import registered_format
from studio.model.loading import ModelError
from studio.ui.common import UIContext, error_message

FORMAT_CHOICES = ("auto", *FORMATS, *PREFERENCE_FORMATS)
# Every ColumnMap field gets a dropdown (elem_id ds-col-<field>); each format shows its own.
COLUMN_FIELDS = (
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "messages",
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "system_tag",
    "text",
)
_CHAT_FIELDS = ("messages", "system", "role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": _CHAT_FIELDS,
    "openai": _CHAT_FIELDS,
    "text": ("text",),
}
_LABELS = {
    "instruction": "Instruction column",
    "input": "Input column (optional)",
    "output": "Output (answer) column",
    "system": "System prompt column (optional)",
    "history": "History column (optional)",
    "messages": "Messages column",
    "role_tag": "Role key in a message",
    "content_tag": "Content key in a message",
    "user_tag": "Role value of the user",
    "assistant_tag": "Role value of the assistant",
    "system_tag": "Role value of the system",
    "text": "Text column",
}

PREVIEW_ROWS = 8
STATS_LIMIT = 5000  # examples tokenized for the statistics: about 2 s on a 2-core CPU
MAX_SHOWN_ISSUES = 20
TRAIN_OPEN, TRAIN_CLOSE = "⟦", "⟧"
DEFAULT_CUTOFF = 512
PREVIEW_COLUMNS = ["row", "text", "tokens", "trained tokens", "truncated"]
PAIR_COLUMNS = ["row", "prompt", "chosen", "rejected", "tokens (chosen / rejected)", "truncated"]
KTO_COLUMNS = ["row", "prompt", "answer", "label", "tokens", "truncated"]
TABLE_COLUMNS = ["name", "format", "rows", "bundled", "description"]
DOCTOR_COLUMNS = ["kind", "severity", "rows", "detail", "fix", "hint"]
DOCTOR_VAL_SIZE = 0.1  # the presets' validation share: the leakage check then has a split to check
DOCTOR_SEED = 42  # the run config's default seed


# ---------------------------------------------------------------- reading


@functools.lru_cache(maxsize=1)
def preview_tokenizer():
    """The bundled model's tokenizer: previews show what the default model would be trained on."""
    from studio.model.loading import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("bundled"))


def source_path(file: str | None, path: str | None) -> Path:
    """The file to read: an upload wins over a typed server path."""
    if file:
        return Path(file)
    if path and path.strip():
        return Path(path.strip()).expanduser()
    raise DataError("Choose a file to upload, or type the path of a dataset file on the server.")


@functools.lru_cache(maxsize=2)
def _rows_cached(path: str, mtime_ns: int, size: int) -> list[dict]:
    return read_rows(Path(path))


def file_rows(path: Path) -> list[dict]:
    """read_rows, cached on (path, mtime, size): choosing a file fills the dropdowns and then checks it."""
    try:
        st = path.stat()
    except OSError:
        return read_rows(path)  # the engine says what is wrong with the path
    return _rows_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


def effective_format(rows: list[dict], fmt: str | None) -> str:
    """The format asked for, or the detected one (preference columns first)."""
    return registered_format(rows, None if not fmt or fmt == "auto" else fmt)


def column_map(rows: list[dict], fmt: str, values: dict[str, str | None]) -> ColumnMap:
    """The engine's guess for `fmt`, overridden by what the dropdowns say (empty = the usual name)."""
    merged = guess_column_map(rows, fmt).to_dict()
    usual = ColumnMap()
    for name in FORMAT_FIELDS[fmt]:
        value = (values.get(name) or "").strip()
        # a value equal to the usual name adds nothing, unless it undoes a guessed override
        if value and (value != usual.name(name, fmt) or name in merged):
            merged[name] = value
    return ColumnMap.from_dict(merged)


def column_values(columns: dict[str, str | None]) -> dict[str, str | None]:
    """The column-map dropdown values by field; other keys are ignored."""
    return {name: columns.get(name) for name in COLUMN_FIELDS}


# ---------------------------------------------------------------- column dropdowns


def message_keys(rows: list[dict], messages_col: str, role_tag: str) -> tuple[list[str], list[str]]:
    """Keys used inside the message lists, and the role values seen under `role_tag` (first 50 rows)."""
    keys: dict[str, None] = {}
    roles: dict[str, None] = {}
    for row in rows[:50]:
        value = row.get(messages_col)
        if not isinstance(value, list):
            continue
        for item in value:
            if isinstance(item, dict):
                keys.update(dict.fromkeys(k for k, v in item.items() if v is not None))
                if isinstance(item.get(role_tag), str):
                    roles.setdefault(item[role_tag], None)
    return list(keys), list(roles)


def column_choices(rows: list[dict], fmt: str) -> dict[str, list[str]]:
    """For each field of `fmt`, what its dropdown offers: file columns, message keys, or role values."""
    resolved = guess_column_map(rows, fmt).resolve(fmt)
    columns = file_columns(rows)
    choices = {name: columns for name in FORMAT_FIELDS[fmt]}
    if fmt in ("sharegpt", "openai"):
        keys, roles = message_keys(rows, resolved.messages, resolved.role_tag)
        choices.update(role_tag=keys, content_tag=keys, user_tag=roles, assistant_tag=roles, system_tag=roles)
    return choices


def column_updates(rows: list[dict] | None, fmt: str | None) -> list[dict]:
    """One gr.update per COLUMN_FIELDS entry: the format's fields shown, filled with the file's own names."""
    if rows is None or fmt is None:
        return [gr.update(visible=False, choices=[], value="") for _ in COLUMN_FIELDS]
    if fmt in PREFERENCE_FORMATS:  # read by their usual names (a column map comes with the CLI's --columns)
        return [gr.update(visible=False, value="") for _ in COLUMN_FIELDS]
    resolved = guess_column_map(rows, fmt).resolve(fmt)
    choices = column_choices(rows, fmt)
    updates = []
    for name in COLUMN_FIELDS:
        if name not in FORMAT_FIELDS[fmt]:
            updates.append(gr.update(visible=False, value=""))
            continue
        options = choices[name]
        guess = resolved.name(name, fmt)
        updates.append(
            gr.update(
                visible=True,
                choices=options,
                value=guess if guess in options else "",
                info=f"Empty = the usual name '{ColumnMap().name(name, fmt)}'.",
            )
        )
    return updates


def fill_columns(file: str | None, path: str | None, fmt: str = "auto") -> list[dict]:
    """Callback when a file or a format is chosen. Errors are left to the check that follows."""
    try:
        rows = file_rows(source_path(file, path))
        return column_updates(rows, effective_format(rows, fmt))
    except DataError:
        return column_updates(None, None)


# ---------------------------------------------------------------- preview and statistics


def marked_text(spans: list[tuple[str, bool]]) -> str:
    """Decoded spans joined, trained ones wrapped in ⟦ ⟧."""
    return "".join(f"{TRAIN_OPEN}{text}{TRAIN_CLOSE}" if trained else text for text, trained in spans)


def preview_frame(tokenizer: Any, examples: list[Example], numbers: list[int], cutoff: int) -> pd.DataFrame:
    rows = []
    for number, example in zip(numbers, examples, strict=True):
        sample = build_sample(tokenizer, example, cutoff)
        rows.append(
            {
                "row": number,
                "text": marked_text(render_preview(tokenizer, sample)),
                "tokens": sample.full_length,
                "trained tokens": sample.trained_tokens,
                "truncated": "yes" if sample.truncated else "no",
            }
        )
    return pd.DataFrame(rows, columns=PREVIEW_COLUMNS)


def token_lengths(tokenizer: Any, examples: list[Example], cutoff: int) -> list[int]:
    """Full lengths (before truncation), so the share over the cutoff can be measured."""
    return [build_sample(tokenizer, ex, cutoff).full_length for ex in examples]


def stats_markdown(stats: TokenStats, of_total: int | None = None) -> str:
    sampled = f" (the first {stats.rows} of {of_total} examples)" if of_total and of_total > stats.rows else ""
    return (
        f"**Token lengths**{sampled}\n\n"
        f"| examples | min | median | p95 | max | mean | longer than {stats.cutoff_len} |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {stats.rows} | {stats.min} | {stats.median:g} | {stats.p95} | {stats.max} | {stats.mean:.1f} "
        f"| {stats.truncated_share:.1%} |"
    )


def length_histogram(lengths: list[int], cutoff: int, bins: int = 20) -> go.Figure:
    """Bars of token lengths with the cutoff as a dashed vertical line."""
    fig = go.Figure()
    groups = histogram(lengths, bins=max(1, min(bins, len(set(lengths))))) if lengths else []
    if groups:
        fig.add_bar(
            x=[(low + high) / 2 for low, high, _ in groups],
            y=[count for _, _, count in groups],
            width=[max(high - low, 1) for low, high, _ in groups],
            customdata=[f"{low:.0f}–{high:.0f}" for low, high, _ in groups],
            hovertemplate="%{customdata} tokens: %{y} examples<extra></extra>",
            name="examples",
        )
    fig.add_vline(x=cutoff, line_dash="dash", line_color="firebrick", annotation_text=f"cutoff {cutoff}")
    fig.update_layout(
        xaxis_title="tokens per example",
        yaxis_title="examples",
        height=280,
        margin={"l": 40, "r": 20, "t": 30, "b": 40},
        showlegend=False,
    )
    return fig


def cleaned_with_numbers(
    examples: list[Example], numbers: list[int], opts: CleanOptions = CleanOptions()
) -> tuple[list[Example], list[int]]:
    """clean_examples' rules applied one example at a time, so each kept example keeps its row number."""
    one_at_a_time = dataclasses.replace(opts, dedupe=False)  # dedupe needs the whole list: done here
    kept, kept_numbers, seen = [], [], set()
    for number, example in zip(numbers, examples, strict=True):
        try:
            (clean,), _ = clean_examples([example], one_at_a_time)
        except DataError:  # dropped by a per-example rule
            continue
        if opts.dedupe and clean in seen:
            continue
        seen.add(clean)
        kept.append(clean)
        kept_numbers.append(number)
    return kept, kept_numbers


def issues_markdown(report: ValidationReport, limit: int = MAX_SHOWN_ISSUES) -> str:
    """Every problem with its row number, up to `limit`; the rest counted."""
    lines = []
    for issue in report.issues[:limit]:
        where = "file" if issue.row == 0 else f"row {issue.row}"
        skipped = " (skipped)" if issue.severity == Severity.WARNING else ""
        lines.append(f"- **{where}**{skipped}: {issue.reason}")
    rest = len(report.issues) - limit
    if rest > 0:
        lines.append(f"- … and {rest} more")
    return "\n".join(lines)


def validation_markdown(name: str, fmt: str, detected: bool, report: ValidationReport) -> str:
    how = "detected" if detected else "chosen"
    head = f"`{name}`: {report.total_rows} rows read, {len(report.examples)} usable as **{fmt}** ({how})."
    if report.fatal:
        errors = report.errors
        status = f"**❌ {len(errors)} problem{'s' if len(errors) != 1 else ''} to fix.** {head}"
        hint = (
            "\n\nFix these rows in the file, or tick *Skip invalid rows* to leave them out."
            if any(i.row > 0 for i in errors)
            else ""
        )
        return f"{status}\n\n{issues_markdown(report)}{hint}"
    status = f"**Ready to register.** {head}"
    return status + (f"\n\n{issues_markdown(report)}" if report.issues else "")


@dataclass
class Checked:
    """What a check produced, in the order of the check's outputs."""

    message: str
    preview: pd.DataFrame
    stats: str
    figure: go.Figure | None

    def outputs(self) -> tuple:
        return self.message, self.preview, self.stats, self.figure


def _empty_preview() -> pd.DataFrame:
    return pd.DataFrame(columns=PREVIEW_COLUMNS)


def examples_view(examples: list[Example], numbers: list[int], cutoff: Any, tokenizer: Any = None) -> Checked:
    """Preview, statistics and histogram of examples that are already validated and cleaned."""
    cutoff = check_cutoff(cutoff)
    tokenizer = tokenizer or preview_tokenizer()
    measured = examples[:STATS_LIMIT]
    lengths = token_lengths(tokenizer, measured, cutoff)
    preview = preview_frame(tokenizer, examples[:PREVIEW_ROWS], numbers[:PREVIEW_ROWS], cutoff)
    stats = stats_markdown(token_stats(lengths, cutoff), of_total=len(examples))
    return Checked("", preview, stats, length_histogram(lengths, cutoff))


def check_preference(name: str, rows: list[dict], fmt: str, detected: bool, cutoff: Any, skip_invalid: bool) -> tuple:
    """A preference file's check: every row validated, then the pairs (or labelled answers) side by side."""
    report = validate_preference_rows(rows, fmt, PreferenceColumns(), skip_invalid=bool(skip_invalid))
    message = validation_markdown(name, fmt, detected, report)
    if not report.examples:
        return Checked(message, _empty_preview(), "", None).outputs()
    view = preference_view(report.examples, report.kept_rows, cutoff)
    return Checked(message, view.preview, view.stats, view.figure).outputs()


def answer_length(tokenizer: Any, prompt: tuple, answer: str) -> int:
    """Tokens of prompt + answer as the chat template renders them, uncut."""
    return build_sample(tokenizer, Example(messages=(*prompt, Message("assistant", answer))), FULL).full_length


FULL = 10**9  # a cutoff that cuts nothing: lengths are measured whole, then compared with the real one


def prompt_text(prompt: tuple) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in prompt)


def preference_view(
    items: list[PreferencePair | LabeledCompletion], numbers: list[int], cutoff: Any, tokenizer: Any = None
) -> Checked:
    """Pairs with chosen and rejected side by side (each answer, the trained part, in ⟦ ⟧), or labelled
    answers; token statistics of every side and a histogram of both."""
    cutoff = check_cutoff(cutoff)
    tokenizer = tokenizer or preview_tokenizer()
    measured = items[:STATS_LIMIT]
    if isinstance(items[0], PreferencePair):
        sides = {
            "chosen": [answer_length(tokenizer, p.prompt, p.chosen) for p in measured],
            "rejected": [answer_length(tokenizer, p.prompt, p.rejected) for p in measured],
        }
        frame = pd.DataFrame(
            [
                {"row": n, "prompt": prompt_text(p.prompt), "chosen": f"{TRAIN_OPEN}{p.chosen}{TRAIN_CLOSE}",
                 "rejected": f"{TRAIN_OPEN}{p.rejected}{TRAIN_CLOSE}",
                 "tokens (chosen / rejected)": f"{c} / {r}", "truncated": "yes" if max(c, r) > cutoff else "no"}
                for n, p, c, r in zip(numbers[:PREVIEW_ROWS], items, sides["chosen"], sides["rejected"], strict=False)
            ],
            columns=PAIR_COLUMNS,
        )  # fmt: skip
    else:
        lengths = [answer_length(tokenizer, i.prompt, i.completion) for i in measured]
        sides = {
            "desirable": [n for n, i in zip(lengths, measured, strict=True) if i.desirable],
            "undesirable": [n for n, i in zip(lengths, measured, strict=True) if not i.desirable],
        }
        frame = pd.DataFrame(
            [
                {"row": n, "prompt": prompt_text(i.prompt), "answer": f"{TRAIN_OPEN}{i.completion}{TRAIN_CLOSE}",
                 "label": "desirable" if i.desirable else "undesirable", "tokens": length,
                 "truncated": "yes" if length > cutoff else "no"}
                for n, i, length in zip(numbers[:PREVIEW_ROWS], items, lengths, strict=False)
            ],
            columns=KTO_COLUMNS,
        )  # fmt: skip
    stats = "\n\n".join(
        f"**{side}**\n\n" + stats_markdown(token_stats(lengths, cutoff), of_total=len(items)).split("\n\n", 1)[1]
        for side, lengths in sides.items()
    )
    return Checked("", frame, "**Token lengths** (prompt + answer)\n\n" + stats, sides_histogram(sides, cutoff))


def sides_histogram(sides: dict[str, list[int]], cutoff: int) -> go.Figure:
    """The length histogram with one bar series per side (chosen / rejected, or desirable / undesirable)."""
    fig = length_histogram([n for lengths in sides.values() for n in lengths], cutoff)
    fig.data = ()
    for side, lengths in sides.items():
        fig.add_histogram(x=lengths, name=side, opacity=0.6, nbinsx=20)
    fig.update_layout(barmode="overlay", showlegend=True)
    return fig


def check_cutoff(cutoff: Any) -> int:
    if cutoff is None or int(cutoff) != cutoff or cutoff < 1:
        raise DataError(f"The cutoff length must be a whole number of tokens, at least 1 (got {cutoff!r}).")
    return int(cutoff)


def check_dataset(
    file: str | None = None,
    path: str | None = "",
    fmt: str = "auto",
    cutoff: float | None = DEFAULT_CUTOFF,
    skip_invalid: bool = False,
    **columns: str | None,
) -> tuple:
    """Validate and preview without registering -> (message, preview, stats, histogram)."""
    try:
        source = source_path(file, path)
        rows = file_rows(source)
        chosen = effective_format(rows, fmt)
        if chosen in PREFERENCE_FORMATS:
            return check_preference(source.name, rows, chosen, fmt in (None, "", "auto"), cutoff, skip_invalid)
        cmap = column_map(rows, chosen, column_values(columns))
        report = validate_rows(rows, chosen, cmap, skip_invalid=bool(skip_invalid))
        message = validation_markdown(source.name, chosen, fmt in (None, "", "auto"), report)
        if not report.examples:
            return Checked(message, _empty_preview(), "", None).outputs()
        examples, numbers = cleaned_with_numbers(report.examples, report.kept_rows)
        if not examples:
            return Checked(message + "\n\nCleaning leaves no examples.", _empty_preview(), "", None).outputs()
        view = examples_view(examples, numbers, cutoff)
    except (DataError, ModelError) as err:  # their text says what to do
        return Checked(error_message(err), _empty_preview(), "", None).outputs()
    dropped = len(report.examples) - len(examples)
    if dropped:
        message += f"\n\nCleaning drops {dropped} more (empty or duplicate examples)."
    return Checked(message, view.preview, view.stats, view.figure).outputs()


# ---------------------------------------------------------------- the registry


def datasets_frame(home: Path) -> pd.DataFrame:
    rows = [
        {"name": e.name, "format": e.format, "rows": e.rows, "bundled": e.bundled, "description": e.description}
        for e in DatasetRegistry(home).list()
    ]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def list_datasets(home: Path, selected: str | None = None) -> tuple:
    """(table, select update, message update): the registered datasets, bundled samples included."""
    try:
        frame = datasets_frame(home)
    except DataError as err:
        return pd.DataFrame(columns=TABLE_COLUMNS), gr.update(choices=[], value=None), error_message(err)
    names = list(frame["name"])
    value = selected if selected in names else (names[0] if names else None)
    return frame, gr.update(choices=names, value=value), gr.update()


def register_dataset(
    home: Path,
    file: str | None = None,
    path: str | None = "",
    fmt: str = "auto",
    name: str = "",
    description: str = "",
    skip_invalid: bool = False,
    clean: CleanOptions | None = None,
    **columns: str | None,
) -> tuple:
    """Register the checked file -> (message, table, select). On failure only the message changes.
    The size limit is the engine's (STUDIO_MAX_DATASET_MB), the same as the CLI's."""
    registry = DatasetRegistry(home)
    name = (name or "").strip()
    try:
        source = source_path(file, path)
        chosen, cmap = None, None
        values = column_values(columns)
        if any(values.values()):
            rows = file_rows(source)
            chosen = effective_format(rows, fmt)
            cmap = column_map(rows, chosen, values)
        elif fmt and fmt != "auto":
            chosen = fmt
        entry, report, clean = registry.add(
            name,
            source,
            fmt=chosen,
            column_map=cmap,
            description=description or "",
            skip_invalid=bool(skip_invalid),
            clean=clean or CleanOptions(),
        )
    except DataError as err:
        return error_message(err), gr.update(), gr.update()
    message = f"**Registered '{entry.name}'**: {entry.rows} examples, format **{entry.format}**. {clean.summary()}"
    if report.warnings:
        message += f"\n\n{len(report.warnings)} rows skipped:\n\n{issues_markdown(report)}"
    table, select, _ = list_datasets(home, entry.name)
    return message, table, select


def inspect_dataset(home: Path, name: str | None, cutoff: float | None = DEFAULT_CUTOFF) -> tuple:
    """(entry as a dict, message, preview, stats, histogram) of a registered dataset."""
    empty = (None, _empty_preview(), "", None)
    if not name:
        return (None, "Choose a dataset in the list first.", *empty[1:])
    try:
        registry = DatasetRegistry(home)
        entry = registry.get(name)
        if entry.format in PREFERENCE_FORMATS:
            items = registry.load_preference(name)
            view = preference_view(items, list(range(1, len(items) + 1)), cutoff)
        else:
            examples = registry.load_examples(name)
            view = examples_view(examples, list(range(1, len(examples) + 1)), cutoff)
    except (DataError, ModelError) as err:
        return (None, error_message(err), *empty[1:])
    where = "bundled sample" if entry.bundled else "registered dataset"
    message = f"**{entry.name}** ({where}): {entry.rows} examples, format **{entry.format}**."
    return entry.to_dict(), message, view.preview, view.stats, view.figure


def delete_dataset(home: Path, name: str | None) -> tuple:
    """(message, table, select, entry). Bundled samples are refused by the engine; nothing changes then."""
    if not name:
        return "Choose a dataset in the list first.", gr.update(), gr.update(), gr.update()
    try:
        DatasetRegistry(home).remove(name)
    except DataError as err:
        return error_message(err), gr.update(), gr.update(), gr.update()
    table, select, _ = list_datasets(home)
    return f"Deleted '{name}'.", table, select, None


# ---------------------------------------------------------------- the dataset doctor


def findings_frame(report: DoctorReport | None) -> pd.DataFrame:
    """One line per finding; rows numbered from 1, as in the preview."""
    rows = [
        {
            "kind": f.kind,
            "severity": str(f.severity),
            "rows": row_numbers(f.rows),
            "detail": f.detail,
            "fix": f.fix or "",
            "hint": f.hint,
        }
        for f in (report.findings if report else [])
    ]
    return pd.DataFrame(rows, columns=DOCTOR_COLUMNS)


def doctor_markdown(report: DoctorReport) -> str:
    status = "**✅ Healthy.**" if report.healthy else f"**⚠️ {len(report.warnings)} to look at.**"
    note = "\n\nRow numbers count from 1, as in the preview." if report.findings else ""
    return f"{status} {report.summary()}{note}"


def _doctor_settings(cutoff: Any, val_size: Any, seed: Any) -> tuple[int, float, int]:
    cutoff = check_cutoff(cutoff)
    val = float(val_size or 0.0)
    if not 0 <= val < 1:
        raise DataError(f"The validation share must be at least 0 and below 1 (got {val_size!r}); 0.1 is typical.")
    if seed is None or int(seed) != seed:
        raise DataError(f"The seed must be a whole number (got {seed!r}), the same as the run's train.seed.")
    return cutoff, val, int(seed)


def examine_dataset(
    home: Path,
    name: str | None,
    cutoff: float | None = DEFAULT_CUTOFF,
    val_size: float | None = DOCTOR_VAL_SIZE,
    seed: float | None = DOCTOR_SEED,
) -> tuple:
    """(summary, findings, report as a dict, fixed-copy name, fix kinds) for a registered dataset, checked
    with the bundled model's tokenizer. On failure only the summary says what is wrong."""
    if not name:
        return "Choose a dataset in the list first.", findings_frame(None), None, gr.update(), gr.update()
    try:
        settings = _doctor_settings(cutoff, val_size, seed)
        registry = DatasetRegistry(home)
        examples = registry.load_examples(name)
        report = diagnose(name, examples, preview_tokenizer(), *settings)
        suggested = free_name(registry, f"{name}-clean")
    except (DataError, ModelError) as err:
        return error_message(err), findings_frame(None), None, gr.update(), gr.update(choices=[], value=[])
    kinds = fixable_kinds(report.findings)
    return (
        doctor_markdown(report),
        findings_frame(report),
        report.to_dict(),
        gr.update(value=suggested),
        gr.update(choices=kinds, value=kinds),
    )


def follow_selection(home: Path, name: str | None) -> dict:
    """The doctor's dataset follows the list's selection; it also takes any typed name (API callers)."""
    try:
        names = [e.name for e in DatasetRegistry(home).list()]
    except DataError:
        names = []
    return gr.update(choices=names, value=name)


def fix_dataset(
    home: Path, name: str | None, new_name: str | None, report: dict | None, kinds: list[str] | None = None
) -> tuple:
    """Register a copy of `name` without the rows the chosen safe fixes remove -> (message, table, select).
    `report` is what Examine returned: only findings the user has seen are applied."""
    if not name:
        return "Choose a dataset in the list first.", gr.update(), gr.update()
    if not report:
        return f"Examine '{name}' first: the fixes apply to the findings shown.", gr.update(), gr.update()
    try:
        parsed = DoctorReport.from_dict(report)
        if parsed.dataset != name:
            raise DataError(
                f"The findings shown are for '{parsed.dataset}', not '{name}'. Press Examine for '{name}' first."
            )
        chosen = set(kinds) if kinds is not None else None
        if chosen is not None and not rows_to_remove(parsed.findings, chosen):
            raise DataError("No fix is chosen, or the chosen ones remove nothing. Tick at least one kind of fix.")
        entry, result = apply_fixes(DatasetRegistry(home), name, parsed, (new_name or "").strip(), chosen)
    except DataError as err:
        return error_message(err), gr.update(), gr.update()
    message = (
        f"**Registered '{entry.name}'**: {entry.rows} examples; {result.summary()}. '{name}' is unchanged, "
        "so runs that used it can be repeated."
    )
    table, select, _ = list_datasets(home, entry.name)
    return message, table, select


# ---------------------------------------------------------------- layout and wiring


def _source_form() -> SimpleNamespace:
    """The left column: the file (upload or server path), its format and column map, the cutoff, Check,
    then the name, description and Register."""
    upload = gr.File(label="Dataset file", file_types=[".json", ".jsonl", ".csv", ".parquet"], elem_id="ds-upload")
    path = gr.Textbox(
        value="",
        label="…or a path on the server",
        placeholder="/data/my_dataset.jsonl (press Enter)",
        elem_id="ds-path",
    )
    fmt = gr.Dropdown(list(FORMAT_CHOICES), value="auto", label="Format", elem_id="ds-format")
    with gr.Accordion("Column map", open=True):
        column_boxes = [
            gr.Dropdown(
                choices=[],
                value="",
                label=_LABELS[name],
                allow_custom_value=True,
                visible=False,
                elem_id=f"ds-col-{name}",
            )
            for name in COLUMN_FIELDS
        ]
    cutoff = gr.Number(
        value=DEFAULT_CUTOFF, precision=0, minimum=1, label="Cutoff length (tokens)", elem_id="ds-cutoff"
    )
    check = gr.Button("Check", elem_id="ds-check")
    name = gr.Textbox(value="", label="Name", placeholder="e.g. support-chats-v2", elem_id="ds-name")
    description = gr.Textbox(value="", label="Description", elem_id="ds-description")
    skip_invalid = gr.Checkbox(value=False, label="Skip invalid rows", elem_id="ds-skip-invalid")
    register = gr.Button("Register", variant="primary", elem_id="ds-register")
    return SimpleNamespace(**locals())


def _check_view() -> SimpleNamespace:
    """The right column: the message, the preview as the model sees it, the stats and the length histogram."""
    message = gr.Markdown(elem_id="ds-message")
    preview = gr.Dataframe(
        value=_empty_preview(),
        label=f"Preview: the first rows as the model sees them ({TRAIN_OPEN}…{TRAIN_CLOSE} = trained)",
        interactive=False,
        wrap=True,
        elem_id="ds-preview",
    )
    stats = gr.Markdown(elem_id="ds-stats")
    hist = gr.Plot(label="Token lengths", elem_id="ds-hist")
    return SimpleNamespace(**locals())


def _registered_list() -> SimpleNamespace:
    gr.Markdown("### Registered datasets")
    table = gr.Dataframe(
        value=pd.DataFrame(columns=TABLE_COLUMNS), interactive=False, label="Datasets", elem_id="ds-table"
    )
    with gr.Row():
        select = gr.Dropdown(choices=[], value=None, label="Dataset", elem_id="ds-select", scale=3)
        inspect = gr.Button("Inspect", elem_id="ds-inspect", scale=1)
        delete = gr.Button("Delete", variant="stop", elem_id="ds-delete", scale=1)
        refresh = gr.Button("Refresh", elem_id="ds-refresh", scale=1)
    entry = gr.JSON(label="Entry", elem_id="ds-entry")
    return SimpleNamespace(**locals())


DOCTOR_INTRO = (
    "Examine a registered dataset (it follows the list's selection) with the cutoff length set above: "
    "duplicates and near copies, prompts with conflicting answers, length and language outliers, answers "
    "that lose their EOS, and rows that leak across the train / validation split. Fixes register a "
    "cleaned copy under a new name; the original is never changed."
)


def _doctor_panel() -> SimpleNamespace:
    with gr.Accordion("Dataset doctor", open=False, elem_id="doctor"):
        gr.Markdown(DOCTOR_INTRO)
        with gr.Row():
            dataset = gr.Dropdown(
                choices=[],
                value=None,
                allow_custom_value=True,
                label="Dataset to examine",
                elem_id="doctor-dataset",
                scale=2,
            )
            val_size = gr.Number(
                value=DOCTOR_VAL_SIZE,
                minimum=0,
                maximum=0.99,
                label="Validation share (for the leakage check; 0 = no split)",
                elem_id="doctor-val-size",
            )
            seed = gr.Number(value=DOCTOR_SEED, precision=0, label="Seed (the run's)", elem_id="doctor-seed")
            examine = gr.Button("Examine", elem_id="doctor-run")
        summary = gr.Markdown(elem_id="doctor-summary")
        findings = gr.Dataframe(
            value=findings_frame(None), interactive=False, wrap=True, label="Findings", elem_id="doctor-findings"
        )
        with gr.Row():
            fix_kinds = gr.CheckboxGroup(choices=[], value=[], label="Fixes to apply", elem_id="doctor-fix-kinds")
            fix_name = gr.Textbox(value="", label="Name of the fixed copy", elem_id="doctor-fix-name")
            fix = gr.Button("Apply safe fixes", variant="primary", elem_id="doctor-fix")
        with gr.Accordion("Report (JSON)", open=False):
            report_json = gr.JSON(label="Report", elem_id="doctor-report")
    return SimpleNamespace(**locals())


def _wire_buttons(home: Path, tab, src: SimpleNamespace, view: SimpleNamespace, listed: SimpleNamespace) -> None:
    """Check, Register, the list (Refresh, tab selection, page load), Inspect and Delete."""
    source = [src.upload, src.path, src.fmt]
    # the column map travels as keyword arguments: API callers pass e.g. output="answer" by name
    columns = dict(zip(COLUMN_FIELDS, src.column_boxes, strict=True))
    check_outputs = [view.message, view.preview, view.stats, view.hist]
    check_inputs = [*source, src.cutoff, src.skip_invalid]
    src.check.click(check_dataset, check_inputs, check_outputs, api_name="check_dataset", inputs_kwargs=columns)
    src.register.click(
        functools.partial(register_dataset, home),
        [*source, src.name, src.description, src.skip_invalid],
        [view.message, listed.table, listed.select],
        api_name="register_dataset",
        inputs_kwargs=columns,
    )
    list_fn, list_outputs = functools.partial(list_datasets, home), [listed.table, listed.select, view.message]
    listed.refresh.click(list_fn, listed.select, list_outputs, api_name="list_datasets")
    tab.select(list_fn, listed.select, list_outputs, api_visibility="private")
    gr.on(None, list_fn, None, list_outputs, api_visibility="private")  # on page load (no inputs: else also on change)
    listed.inspect.click(
        functools.partial(inspect_dataset, home),
        [listed.select, src.cutoff],
        [listed.entry, *check_outputs],
        api_name="inspect_dataset",
    )
    delete_outputs = [view.message, listed.table, listed.select, listed.entry]
    listed.delete.click(
        functools.partial(delete_dataset, home), listed.select, delete_outputs, api_name="delete_dataset"
    )


def _wire_doctor(home: Path, src: SimpleNamespace, listed: SimpleNamespace, doc: SimpleNamespace) -> None:
    doc.examine.click(
        functools.partial(examine_dataset, home),
        [doc.dataset, src.cutoff, doc.val_size, doc.seed],
        [doc.summary, doc.findings, doc.report_json, doc.fix_name, doc.fix_kinds],
        api_name="dataset_doctor",
    )
    doc.fix.click(
        functools.partial(fix_dataset, home),
        [doc.dataset, doc.fix_name, doc.report_json, doc.fix_kinds],
        [doc.summary, listed.table, listed.select],
        api_name="dataset_doctor_fix",
    )


def _wire_automatic(home: Path, src: SimpleNamespace, view: SimpleNamespace, listed, doc) -> None:
    """Automatic events last: private events are named after their function too, and the first event to
    claim a name keeps it (check_dataset must stay the Check button's)."""
    source = [src.upload, src.path, src.fmt]
    columns = dict(zip(COLUMN_FIELDS, src.column_boxes, strict=True))
    check_inputs, check_outputs = (
        [*source, src.cutoff, src.skip_invalid],
        [view.message, view.preview, view.stats, view.hist],
    )

    def fill_then_check(trigger):
        trigger(fill_columns, source, src.column_boxes, api_visibility="private").then(
            check_dataset, check_inputs, check_outputs, api_visibility="private", inputs_kwargs=columns
        )

    # the doctor examines what the list has selected (also after a fix selects the new copy)
    follow = functools.partial(follow_selection, home)
    listed.select.change(follow, listed.select, doc.dataset, api_visibility="private")
    fill_then_check(src.upload.upload)
    fill_then_check(src.path.submit)
    fill_then_check(src.fmt.input)
    src.upload.clear(fill_columns, source, src.column_boxes, api_visibility="private")


def build(ctx: UIContext, tab) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            src = _source_form()
        with gr.Column(scale=3):
            view = _check_view()
    listed = _registered_list()
    doc = _doctor_panel()
    _wire_buttons(ctx.home, tab, src, view, listed)
    _wire_doctor(ctx.home, src, listed, doc)
    _wire_automatic(ctx.home, src, view, listed, doc)
