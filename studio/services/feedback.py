"""Judgements from the Chat tab's compare mode, kept as preference pairs (issue 15, point 6).

Two models answer the same message, shown as A and B; the user marks the better one (or a tie) and may
edit it into the answer they wanted. Every judgement is appended to a log in the workspace
(feedback/<name>.jsonl), so none is lost when the page closes. "Save" registers the pairs so far as a new
preference dataset version, <name>-v1, <name>-v2, ...: a registered dataset never changes, so a DPO run on
one of them stays reproducible while judging goes on.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from studio.core.fsutil import atomic_write
from studio.core.problems import StrEnum
from studio.data.errors import DataError
from studio.data.formats import Message
from studio.data.preference import PreferencePair
from studio.data.registry import DatasetEntry, DatasetRegistry, validate_dataset_name

FEEDBACK_DIR = "feedback"


class Verdict(StrEnum):
    A = "a"
    B = "b"
    TIE = "tie"


@dataclass(frozen=True)
class Judgement:
    prompt: list[dict[str, str]]  # the conversation both answers reply to, ending with the user's message
    a_model: str  # "base" or a run id
    b_model: str
    a_text: str
    b_text: str
    verdict: Verdict
    edited: str = ""  # the better answer as the user rewrote it (empty: kept as it was)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def winner(self) -> str | None:
        return {Verdict.A: self.a_model, Verdict.B: self.b_model}.get(self.verdict)

    def pair(self) -> PreferencePair | None:
        """The preference pair this judgement gives: the better answer (as edited) over the other; None for
        a tie, or when the two answers say the same."""
        if self.verdict == Verdict.TIE:
            return None
        better, worse = (self.a_text, self.b_text) if self.verdict == Verdict.A else (self.b_text, self.a_text)
        chosen = self.edited.strip() or better
        if chosen.strip() == worse.strip():
            return None
        prompt = tuple(Message(m["role"], m["content"]) for m in self.prompt)
        return PreferencePair(prompt=prompt, chosen=chosen, rejected=worse)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Judgement:
        return cls(**{**data, "verdict": Verdict(data["verdict"])})


@dataclass(frozen=True)
class Tally:
    """Per model pairing (a, b as first met): wins of each and ties."""

    a_model: str
    b_model: str
    a_wins: int = 0
    b_wins: int = 0
    ties: int = 0

    @property
    def total(self) -> int:
        return self.a_wins + self.b_wins + self.ties

    def win_rate(self, model: str) -> float:
        """Share of judgements the model won, a tie counting half."""
        wins = self.a_wins if model == self.a_model else self.b_wins
        return (wins + 0.5 * self.ties) / self.total if self.total else 0.0


def tally(judgements: list[Judgement]) -> list[Tally]:
    """Wins and ties per pair of models, whichever side (A or B) each model was shown on."""
    out: dict[frozenset[str], Tally] = {}
    for j in judgements:
        key = frozenset((j.a_model, j.b_model))
        t = out.get(key) or Tally(j.a_model, j.b_model)
        won = j.winner()
        out[key] = Tally(
            t.a_model,
            t.b_model,
            t.a_wins + (won == t.a_model),
            t.b_wins + (won == t.b_model),
            t.ties + (won is None),
        )
    return list(out.values())


class FeedbackLog:
    """The judgements under one name, one JSON line each, in the workspace."""

    def __init__(self, home: Path, name: str) -> None:
        problem = validate_dataset_name(name)
        if problem:
            raise DataError(problem)
        self.name = name
        self.path = Path(home) / FEEDBACK_DIR / f"{name}.jsonl"

    def add(self, judgement: Judgement) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(judgement.to_dict(), ensure_ascii=False) + "\n")

    def judgements(self) -> list[Judgement]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [Judgement.from_dict(json.loads(line)) for line in lines if line.strip()]

    def pairs(self) -> list[PreferencePair]:
        return [p for p in (j.pair() for j in self.judgements()) if p is not None]


def next_version(registry: DatasetRegistry, name: str) -> str:
    pattern = re.compile(re.escape(name) + r"-v(\d+)$")
    taken = [int(m.group(1)) for e in registry.list() if (m := pattern.match(e.name))]
    return f"{name}-v{max(taken, default=0) + 1}"


def save_version(registry: DatasetRegistry, log: FeedbackLog) -> DatasetEntry:
    """Register every pair judged so far as the next version <name>-vN (a preference dataset)."""
    pairs = log.pairs()
    if not pairs:
        raise DataError(
            "No preference pairs to save yet: mark the better of two answers (A or B) first. Ties, and two "
            "answers that say the same, give no pair."
        )
    version = next_version(registry, log.name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{version}.jsonl"
        atomic_write(path, "".join(json.dumps(p.to_trl(), ensure_ascii=False) + "\n" for p in pairs))
        description = f"{len(pairs)} preference pairs judged in the Chat tab ({log.name})"
        entry, _, _ = registry.add(version, path, fmt="preference", description=description)
    return entry
