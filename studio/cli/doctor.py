"""`studio doctor`: the workspace checkup (studio.services.checkup) rendered for a terminal."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from studio.services.checkup import check, repair


def run_doctor(home: Path, do_repair: bool = False, as_json: bool = False) -> int:
    """The CLI: print findings (and repairs). 0 when healthy or all repaired, 1 when problems remain."""
    findings = check(home)
    done = repair(home, findings) if do_repair and findings else []
    remaining = check(home) if done else findings
    if as_json:
        print(
            json.dumps(
                {
                    "findings": [asdict(f) for f in findings],
                    "repaired": done,
                    "remaining": [asdict(f) for f in remaining],
                },
                indent=2,
            )
        )
    else:
        if not findings:
            print("Workspace is healthy: no problems found.")
        for f in findings:
            print(f.describe())
        for line in done:
            print(f"repaired: {line}")
        if remaining:
            hint = "" if do_repair else " Run `studio doctor --repair` to fix the repairable ones."
            print(f"{len(remaining)} problem(s) remain.{hint}", file=sys.stderr)
    return 1 if remaining else 0
