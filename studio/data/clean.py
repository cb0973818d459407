"""Cleaning: strip, drop empty, filter by answer length, de-duplicate. Rules a practitioner expects."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from studio.data.errors import DataError
from studio.data.formats import Example, Message


@dataclass(frozen=True)
class CleanOptions:
    strip: bool = True  # strip whitespace around every message / text
    drop_empty: bool = True  # drop examples with an empty message after stripping
    dedupe: bool = True  # keep the first of identical examples
    min_answer_chars: int = 1  # every assistant answer (or text) at least this long
    max_answer_chars: int | None = None  # every assistant answer (or text) at most this long
    max_total_chars: int | None = None  # the whole example at most this long

    def __post_init__(self) -> None:
        if self.min_answer_chars < 0:
            raise DataError(f"min_answer_chars must be 0 or more, got {self.min_answer_chars}.")
        for name in ("max_answer_chars", "max_total_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataError(f"{name} must be at least 1 (or empty for no limit), got {value}.")
        if self.max_answer_chars is not None and self.max_answer_chars < self.min_answer_chars:
            raise DataError(
                f"max_answer_chars ({self.max_answer_chars}) is below min_answer_chars "
                f"({self.min_answer_chars}): no answer could pass. Raise the maximum or lower the minimum."
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> CleanOptions:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataError(f"Unknown cleaning options: {', '.join(unknown)}. Allowed: {', '.join(sorted(known))}.")
        return cls(**data)


@dataclass(frozen=True)
class CleanReport:
    stripped: int = 0  # examples changed by stripping (kept or not)
    dropped_empty: int = 0
    dropped_duplicates: int = 0
    dropped_too_short: int = 0
    dropped_too_long: int = 0
    kept: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_empty + self.dropped_duplicates + self.dropped_too_short + self.dropped_too_long

    def summary(self) -> str:
        parts = [f"{self.kept} examples kept"]
        for label, n in (
            ("empty", self.dropped_empty),
            ("too short", self.dropped_too_short),
            ("too long", self.dropped_too_long),
            ("duplicates", self.dropped_duplicates),
        ):
            if n:
                parts.append(f"{n} dropped as {label}")
        if self.stripped:
            parts.append(f"{self.stripped} stripped of surrounding whitespace")
        return ", ".join(parts) + "."


def clean_examples(examples: list[Example], opts: CleanOptions | None = None) -> tuple[list[Example], CleanReport]:
    """Apply the rules in a fixed order: strip, empty, too short, too long, duplicates."""
    opts = opts or CleanOptions()
    counts = dict.fromkeys(
        ("stripped", "dropped_empty", "dropped_duplicates", "dropped_too_short", "dropped_too_long"), 0
    )
    kept: list[Example] = []
    seen: set[Example] = set()
    for example in examples:
        if opts.strip:
            stripped = strip_example(example)
            counts["stripped"] += stripped != example
            example = stripped
        if opts.drop_empty and _has_empty_part(example):
            counts["dropped_empty"] += 1
            continue
        answers = _answers(example)
        if any(len(a) < opts.min_answer_chars for a in answers):
            counts["dropped_too_short"] += 1
            continue
        too_long_answer = opts.max_answer_chars is not None and any(len(a) > opts.max_answer_chars for a in answers)
        too_long_total = opts.max_total_chars is not None and total_chars(example) > opts.max_total_chars
        if too_long_answer or too_long_total:
            counts["dropped_too_long"] += 1
            continue
        if opts.dedupe:
            if example in seen:
                counts["dropped_duplicates"] += 1
                continue
            seen.add(example)
        kept.append(example)

    report = CleanReport(kept=len(kept), **counts)
    if not kept:
        raise DataError(_nothing_left(len(examples), report, opts))
    return kept, report


def strip_example(example: Example) -> Example:
    if example.text is not None:
        return Example(text=example.text.strip())
    messages = tuple(Message(m.role, m.content.strip(), m.tool_calls) for m in example.messages)
    return Example(messages=messages, tools=example.tools)


def total_chars(example: Example) -> int:
    if example.text is not None:
        return len(example.text)
    return sum(len(m.shown) for m in example.messages)


def _answers(example: Example) -> list[str]:
    """What is trained on: the assistant answers, or the whole text."""
    if example.text is not None:
        return [example.text]
    return [m.shown for m in example.messages if m.role == "assistant"]


def _has_empty_part(example: Example) -> bool:
    if example.text is not None:
        return not example.text
    return not example.messages or any(not m.shown for m in example.messages)


def _nothing_left(total: int, report: CleanReport, opts: CleanOptions) -> str:
    if total == 0:
        return "There are no examples to clean. Add rows to the dataset."
    causes = []
    if report.dropped_empty:
        causes.append(f"{report.dropped_empty} were empty after stripping (fill them in)")
    if report.dropped_too_short:
        causes.append(
            f"{report.dropped_too_short} had an answer shorter than min_answer_chars={opts.min_answer_chars} "
            "(lower min_answer_chars)"
        )
    if report.dropped_too_long:
        limits = ", ".join(
            f"{n}={getattr(opts, n)}" for n in ("max_answer_chars", "max_total_chars") if getattr(opts, n)
        )
        causes.append(f"{report.dropped_too_long} were longer than {limits} (raise or clear the limit)")
    if report.dropped_duplicates:
        causes.append(f"{report.dropped_duplicates} were duplicates")
    return f"Cleaning removed all {total} examples: " + "; ".join(causes) + "."
