"""What a validation finds, as data: a Problem names the field it is about, so callers compare paths, never prose.

`str(problem)` is the sentence the user sees (the UI lists them, the CLI joins them on one line); `path` is
the config field ("lora.r", "model.source"), or "" when the problem is about no single field. `Severity`
is the one vocabulary of how bad a finding is; each kind of finding uses the subset it needs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

try:
    from enum import StrEnum
except ImportError:  # Python 3.10

    class StrEnum(str, enum.Enum):  # type: ignore[no-redef]
        """A str whose members compare, print and serialise as their values (enum.StrEnum from 3.11)."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return str(self.value).__format__(spec)


@dataclass(frozen=True)
class Problem:
    """One reason a config (or a request built from one) cannot be used.

    `message` says what is wrong, `fix` what to change; the user reads them as one sentence,
    "message: fix". A problem whose wording does not split that way keeps it all in `message`."""

    path: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.message}: {self.fix}" if self.fix else self.message


class Problems(list):
    """The Problems a check finds, built where it reads well: `p.add("lora.r", "lora.r must be ...")`."""

    def add(self, path: str, message: str, fix: str = "") -> None:
        self.append(Problem(path, message, fix))


def as_problem(item: Problem | str) -> Problem:
    """A Problem as is; a bare sentence (a preset file's, an older caller's) as a problem about no field."""
    return item if isinstance(item, Problem) else Problem("", str(item))


class Severity(StrEnum):
    """How bad a finding is. The values are the words written to files, JSON and the event log.

    Dataset validation (studio.data.validate) uses ERROR and WARNING, the dataset audit WARNING and INFO,
    the training coach CRITICAL, WARNING and INFO; run events are logged at ERROR, WARNING or INFO."""

    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
