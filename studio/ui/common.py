"""What every tab shares: the engine handles, and small helpers to turn engine errors into messages.

Tabs are modules with `build(ctx: UIContext, tab: gr.Tab) -> None`, called inside `with tab:`. They
wire widgets to pure callback functions (module-level, testable without a browser) that take plain
values and return plain values or dataclasses; the callbacks call the engine, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from studio.core.problems import Severity
from studio.core.workspace import Workspace
from studio.runs.queue import JobManager


@dataclass
class UIContext:
    home: Path
    _jobs: JobManager | None = field(default=None, init=False, repr=False)

    @property
    def jobs(self) -> JobManager:
        if self._jobs is None:
            self._jobs = JobManager.of(Workspace.from_env(self.home))
        return self._jobs

    def registry(self):
        from studio.data import DatasetRegistry

        return DatasetRegistry(self.home)


def error_message(err: BaseException) -> str:
    """Engine errors already say what is wrong and how to fix it; show them as they are."""
    problems = getattr(err, "problems", None)
    if problems:
        return "**Please fix:**\n" + "\n".join(f"- {p}" for p in problems)
    return f"**Error:** {err}"


SEVERITY_MARK = {Severity.CRITICAL: "⛔", Severity.WARNING: "⚠️", Severity.INFO: "💡"}


def coach_markdown(advice: list) -> str:
    """The coach's findings (studio.training.coach.Advice) as a short list: what is wrong, with figures, and the fix."""
    if not advice:
        return "**Coach:** nothing to flag so far."
    lines = ["**Coach:**"]
    for a in advice:
        where = f" (step {a.step})" if a.step is not None else ""
        lines.append(f"- {SEVERITY_MARK.get(a.severity, '•')} **{a.title}**{where}: {a.detail} **Fix:** {a.fix}")
    return "\n".join(lines)
