"""`python -m bench` (`make bench`): every bench module in turn, each printing its own table and writing
bench/results/<name>.json; then one line per module. Exit 1 when any module missed a goal.

    python -m bench                 # all of them
    python -m bench chat live       # some of them
"""

from __future__ import annotations

import importlib
import sys
import time

# Cheapest first; memory last (it checks the planner, issue 4). baseline_peft and common are not modules.
ORDER = ("startup", "chat", "live", "packing", "throughput", "memory")


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(ORDER)
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        print(f"unknown bench module(s): {', '.join(unknown)}; choose from {', '.join(ORDER)}", file=sys.stderr)
        return 2
    summary = []
    for name in names:
        print(f"\n== bench.{name}", flush=True)
        started = time.perf_counter()
        try:
            status = importlib.import_module(f"bench.{name}").main([])
        except Exception as err:  # noqa: BLE001 - one module failing must not hide the others' results
            print(f"bench.{name} failed: {type(err).__name__}: {err}", file=sys.stderr)
            status = 3
        summary.append((name, status, time.perf_counter() - started))
    print("\n== summary")
    for name, status, seconds in summary:
        word = {0: "goals met", 1: "goal MISSED", 3: "FAILED"}.get(status, f"exit {status}")
        print(f"{name:12} {word:12} {seconds:6.0f} s")
    return max(s for _, s, _ in summary)


if __name__ == "__main__":
    sys.exit(main())
