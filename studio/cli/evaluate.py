"""`studio eval RUN`: the evaluation's command line and its text report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studio.cli.common import exits_cleanly
from studio.core.workspace import Workspace
from studio.reports.evaluate import PROGRESS_PREFIX, EvalReport, EvalSpec, evaluate_run, summary_table

# -- text output --------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary rows as aligned plain text."""
    head = ["metric", "base", "adapter", "change"]
    cells = [[str(r["metric"]), f"{r['base']:.4f}", f"{r['adapter']:.4f}", f"{r['change']:+.4f}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = [head, *cells]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in lines
    )


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_report(report: EvalReport, examples: int = 3) -> str:
    g = report.generation
    lines = [
        f"Run {report.run_id} on {report.dataset}: {report.samples} samples for loss, {g.prompts} prompts "
        f"(greedy, up to {g.max_new_tokens} new tokens)",
        "",
        format_table(summary_table(report)),
    ]
    for i, ex in enumerate(report.examples[:examples], 1):
        lines += [
            "",
            f"[{i}] prompt:    {_short(ex.prompt)}",
            f"    reference: {_short(ex.reference)}",
            f"    base:      {_short(ex.base)}",
            f"    adapter:   {_short(ex.adapter)}",
        ]
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------


def _default(name: str) -> Any:
    return EvalSpec.__dataclass_fields__[name].default


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`studio eval RUN [--dataset NAME] [--samples N] [--gen-samples N] [--max-new-tokens N] [--json]`."""
    parser.add_argument("run", help="a completed run's id (studio runs lists them)")
    parser.add_argument("--dataset", help="a registered dataset to evaluate on (default: the run's validation split)")
    parser.add_argument("--samples", type=int, default=_default("max_samples"), help="samples scored for loss")
    parser.add_argument(
        "--gen-samples", type=int, default=_default("gen_samples"), help="prompts answered by base and adapter"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=_default("max_new_tokens"), help="longest generated answer"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON (progress goes to stderr)")
    return parser


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    return EvalSpec(args.run, args.dataset, args.samples, args.gen_samples, args.max_new_tokens)


@exits_cleanly
def run_cli(args: argparse.Namespace, home: Path | None = None) -> int:
    """Exit 0 with the report printed; bad input raises, and `studio.cli.main` prints one `error:` line (exit 2)."""

    def say(message: str) -> None:
        print(PROGRESS_PREFIX + message, file=sys.stderr, flush=True)

    report = evaluate_run(spec_from_args(args), home or Workspace.from_env().home, progress=say)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
    return 0
