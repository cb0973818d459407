"""The one base of every error the studio raises on purpose, and the exit code each kind means.

Engine code raises these with a message that says what is wrong and how to fix it; only the CLI turns
them into an `error:` line and an exit status (studio/cli/main.py), so no other module maps errors to
exits or prints them.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # the operation ran and did not succeed (a run failed, an export broke)
    BAD_INPUT = 2  # nothing was done: the input cannot be used (like argparse's own usage errors)


class StudioError(Exception):
    """An error the user can act on: its message is shown as is."""

    exit_code: ClassVar[ExitCode] = ExitCode.BAD_INPUT

    def one_line(self) -> str:
        """The message for an `error:` line. Bad input is folded onto one line (transformers' and YAML's
        reasons span several); a failure keeps its lines, which often carry the cause's own report."""
        text = str(self)
        return " ".join(text.split()) if self.exit_code == ExitCode.BAD_INPUT else text
