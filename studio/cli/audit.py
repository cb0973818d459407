"""`studio datasets doctor NAME`: the dataset audit's command line and its text report."""

from __future__ import annotations

import argparse
import json
import sys

from studio.core.workspace import Workspace
from studio.data.audit import DoctorReport, apply_fixes, diagnose, row_numbers, rows_to_remove
from studio.data.registry import DatasetRegistry

# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`studio datasets doctor NAME ...` (the parser of the `doctor` action)."""
    parser.add_argument("name", help="a registered dataset (or a bundled sample)")
    parser.add_argument(
        "--model", default="bundled", help="whose tokenizer to check with (default: bundled; 'none' skips)"
    )
    parser.add_argument("--cutoff", type=int, default=512, help="cutoff length in tokens, as in the run config")
    parser.add_argument("--val-size", type=float, default=0.0, help="validation share, to check train/val leakage")
    parser.add_argument("--seed", type=int, default=42, help="the run's seed (the split depends on it)")
    parser.add_argument("--against", metavar="DATASET", help="an evaluation dataset that must not leak into this one")
    parser.add_argument("--fix", action="store_true", help="register a copy without the safely fixable rows")
    parser.add_argument("--as", dest="as_name", metavar="NEW_NAME", help="name of the fixed copy (default NAME-clean)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_cli(args: argparse.Namespace) -> int:
    """0 when no finding is a warning, 1 otherwise. DataError / ModelError go up to the CLI (exit 2)."""
    registry = DatasetRegistry(Workspace.from_env().home)
    examples = registry.load_examples(args.name)
    against = registry.load_examples(args.against) if args.against else None
    tokenizer = None
    if (args.model or "").strip().lower() != "none":
        from studio.model.loading import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(args.model))
    report = diagnose(
        args.name, examples, tokenizer, args.cutoff, args.val_size, args.seed, against, args.against or ""
    )
    fixed, nothing = None, args.fix and not rows_to_remove(report.findings)
    if args.fix and not nothing:
        fixed = apply_fixes(registry, args.name, report, args.as_name or f"{args.name}-clean")
    if args.json:
        out = report.to_dict()
        if fixed:
            out["fixed"] = {"entry": fixed[0].to_dict(), "removed_rows": list(fixed[1].removed_rows)}
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
        if fixed:
            print(f"registered '{fixed[0].name}': {fixed[0].rows} rows; {fixed[1].summary()}")
        elif nothing:
            print("nothing to fix: no finding has a safe fix, so no copy was made")
    sys.stdout.flush()
    return 0 if report.healthy else 1


def format_report(report: DoctorReport) -> str:
    lines = [report.summary()]
    if report.findings:
        lines.append("Row numbers count from 1, in the order the dataset loads.")
    for f in report.findings:
        where = f" rows {row_numbers(f.rows)}" if f.rows else ""
        lines.append(f"[{f.severity}] {f.kind}{where}: {f.detail}")
        fix = f.fix or ("none (needs a human)" if f.rows else "none")
        lines.append(f"    fix: {fix}. {f.hint}")
    return "\n".join(lines)
