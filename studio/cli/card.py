"""`studio card RUN [--print]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from studio.cli.common import exits_cleanly
from studio.core.workspace import RunDir, Workspace
from studio.reports.card import write_card

# -- CLI --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run id (or its run folder)")
    parser.add_argument("--print", dest="print_card", action="store_true", help="print the Markdown, not the path")


@exits_cleanly
def run_cli(args: argparse.Namespace) -> int:
    """`studio card RUN [--print]`: exit 0 written, 2 bad input (unknown run)."""
    run_id = args.run
    path = Path(run_id).expanduser()
    if path.is_dir():  # a run folder (or its adapter folder) names its run
        run_id = path.resolve().parent.name if path.name == RunDir.ADAPTER else path.resolve().name
    readme = write_card(Workspace.from_env().home, run_id)
    if args.print_card:
        sys.stdout.write(readme.read_text(encoding="utf-8"))
    else:
        print(readme)
    return 0
