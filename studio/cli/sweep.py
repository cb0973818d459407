"""`studio sweep start|show|promote|list`: the sweep's command line over runs/sweep.py and the queue."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

from studio.cli.common import exits_cleanly
from studio.core.config import RunConfig
from studio.core.store import Run, RunStatus, iso
from studio.core.workspace import Workspace
from studio.runs.queue import JobManager
from studio.runs.sweep import (
    DEFAULT_SCAN_STEPS,
    MAX_PARAMS,
    _fmt,
    _sweepable_list,
    format_values,
    long_run_length,
    parse_params,
    sweep_notes,
    values_of,
)


# -- CLI --------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `studio sweep` subcommands, added to the `sweep` subparser cli.py creates."""
    sub = parser.add_subparsers(dest="sweep_action", required=True, metavar="{start,show,promote,list}")
    s = sub.add_parser("start", help="queue one short scan run per value, cheapest first")
    s.add_argument("config", help="a run config YAML or a preset name; its epochs/max_steps are the long run's")
    s.add_argument(
        "--param",
        action="append",
        required=True,
        metavar="PATH=V1,V2,...",
        help=f"a parameter and its values, e.g. lora.r=8,16,32,64 (at most {MAX_PARAMS}). "
        f"Sweepable: {_sweepable_list()}",
    )
    s.add_argument(
        "--scan-steps",
        type=int,
        default=DEFAULT_SCAN_STEPS,
        metavar="N",
        help=f"train.max_steps of each scan run (default {DEFAULT_SCAN_STEPS})",
    )
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.val_size=0.1")
    s.add_argument("--name", help="the sweep's name; runs are named NAME-r8, NAME-r16, ...")
    s.add_argument("--detach", action="store_true", help="queue the runs and return at once")
    s = sub.add_parser("show", help="a sweep's table of results and the recommended pick")
    s.add_argument("sweep")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("promote", help="start the long run from the sweep's pick")
    s.add_argument("sweep")
    s.add_argument("--detach", action="store_true", help="queue it and return at once")
    s = sub.add_parser("list", help="list sweeps")
    s.add_argument("--json", action="store_true")
    parser.set_defaults(func=run_cli)


@exits_cleanly
def run_cli(args: argparse.Namespace) -> int:
    """Exit 0 on success; errors reach `studio.cli.main`, which maps them to 2 (bad input) or 1 (failed)."""
    commands = {"start": _cmd_start, "show": _cmd_show, "promote": _cmd_promote, "list": _cmd_list}
    return commands[args.sweep_action](args)


def _cmd_start(args: argparse.Namespace) -> int:
    from studio.cli.common import load_run_config

    config = load_run_config(args.config, args.set)
    params = parse_params(args.param)
    jobs = JobManager.of(Workspace.from_env())
    sweep, runs = jobs.submit_sweep(config, params, args.scan_steps, args.name or config.name or "sweep")
    print(f"sweep {sweep.id}: {len(runs)} scan runs of {sweep.scan_steps} steps each, cheapest first")
    for note in sweep_notes(config, params, sweep.scan_steps):
        print(f"  note: {note}")
    paths = [p.path for p in params]
    for i, run in enumerate(runs, 1):
        alpha = f"  (lora.alpha={_fmt(float(run.config['lora']['alpha']))})" if "lora.r" in paths else ""
        print(f"  {i}. {run.id}  {format_values(values_of(run.config, paths))}{alpha}  {run.status.value}")
    print(f"then: studio sweep promote {sweep.id}  (the long run from the pick, {long_run_length(config)})")
    if args.detach:
        print(f"watch: studio sweep show {sweep.id}")
        return 0
    return _follow_sweep(jobs, sweep.id, runs)


def _follow_sweep(jobs, sweep_id: str, runs: Sequence[Run]) -> int:
    """Tail each scan run in turn; a failed run (say, out of memory at a big rank) does not stop the
    scan, an aborted one (Ctrl-C) stops following and leaves the rest queued."""
    from studio.cli.common import follow

    for i, run in enumerate(runs, 1):
        print(f"\n[{i}/{len(runs)}] {run.name}")
        follow(jobs, run.id)
        status = jobs.store.get_run(run.id).status
        if status not in (RunStatus.COMPLETED, RunStatus.FAILED):
            print(
                f"Stopped following: run {run.id} is {status.value}. The sweep's other runs stay queued: "
                f"watch them with `studio sweep show {sweep_id}`, or abort each with `studio abort RUN`."
            )
            return 1
    print()
    return _print_summary(jobs, sweep_id)


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_summary(jobs, sweep_id: str) -> int:
    sweep, rows, pick = jobs.sweep_summary(sweep_id)
    params = "; ".join(f"{p['path']}={','.join(_fmt(v) for v in p['values'])}" for p in sweep.params)
    print(f"sweep {sweep.id} ({sweep.name}): {params}; {sweep.scan_steps} steps per scan run")
    width = max([len("values"), *(len(format_values(r.values)) for r in rows)])
    head = f"{'values':{width}} {'status':10} {'train':>8} {'eval':>8} {'trainable':>11} {'time':>7} {'peak MiB':>9}"
    print(f"    {head}")
    for row in rows:
        mark = "*" if pick is not None and pick.run_id == row.run_id else " "
        seconds = "-" if row.seconds is None else f"{row.seconds:.0f} s"
        print(
            f"  {mark} {format_values(row.values):{width}} {row.status:10} {_cell(row.final_train_loss, '.4f'):>8} "
            f"{_cell(row.final_eval_loss, '.4f'):>8} {_cell(row.trainable_params, ','):>11} {seconds:>7} "
            f"{_cell(row.peak_memory_mb, '.0f'):>9}"
        )
    if not rows:
        print("  (no scan runs left: they were deleted)")
    if pick is None:
        print("pick: none yet (it appears when a scan run completes)")
        return 1
    print(f"pick: {format_values(pick.values)} (run {pick.run_id})")
    print(f"  {pick.reason}")
    if sweep.long_run_id:
        print(f"long run: {sweep.long_run_id}  (studio run {sweep.long_run_id})")
    else:
        base = RunConfig.from_dict(sweep.base_config)
        print(f"next: studio sweep promote {sweep.id}  (trains the pick for {long_run_length(base)})")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:

    jobs = JobManager.of(Workspace.from_env())
    if not args.json:
        _print_summary(jobs, args.sweep)
        return 0
    sweep, rows, pick = jobs.sweep_summary(args.sweep)
    body = {
        "sweep": sweep.to_dict(),
        "runs": [dataclasses.asdict(r) for r in rows],
        "pick": dataclasses.asdict(pick) if pick else None,
    }
    print(json.dumps(body, indent=2, default=str))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from studio.cli.common import follow

    jobs = JobManager.of(Workspace.from_env())
    run = jobs.promote_sweep(args.sweep)
    config = RunConfig.from_dict(run.config)
    print(f"long run {run.id}: {run.status.value}, {long_run_length(config)}  (dir {run.run_dir})")
    sweep = jobs.store.get_sweep(args.sweep)
    paths = [p["path"] for p in sweep.params]
    print(f"  values: {format_values(values_of(run.config, paths))}, lora.alpha={_fmt(float(config.lora.alpha))}")
    return 0 if args.detach else follow(jobs, run.id)


def _cmd_list(args: argparse.Namespace) -> int:

    store = JobManager.of(Workspace.from_env()).store
    sweeps = store.list_sweeps()
    if args.json:
        print(json.dumps([s.to_dict() for s in sweeps], indent=2, default=str))
        return 0
    if not sweeps:
        print("No sweeps yet. Start one: studio sweep start quick-demo --param lora.r=8,16,32 --set data.val_size=0.1")
        return 0
    for s in sweeps:
        runs = store.runs_of_sweep(s.id, include_long=False)
        done = sum(1 for r in runs if r.status == RunStatus.COMPLETED)
        params = "; ".join(f"{p['path']}={','.join(_fmt(v) for v in p['values'])}" for p in s.params)
        long = f"  long run {s.long_run_id}" if s.long_run_id else ""
        print(f"{s.id:44} {done}/{len(runs)} done  {params}  {iso(s.created_at)}{long}")
    return 0
