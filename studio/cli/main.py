"""`studio`: the headless face of the same engine the browser uses.

Exit codes: 0 success; 1 the operation ran and failed (a run failed or was aborted); 2 bad input.
Errors are one line on stderr, starting with "error:".
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from studio.cli.common import UsageError, exits_cleanly, follow, load_run_config
from studio.core.errors import StudioError
from studio.core.workspace import Workspace

# studio.data's FORMATS and PREFERENCE_FORMATS, spelt out: importing the data layer costs ~0.6 s at every
# command's start (tests/unit/test_cli.py keeps the two lists equal).
DATASET_FORMATS = ("alpaca", "sharegpt", "openai", "text", "preference", "kto")


def cmd_train(args: argparse.Namespace) -> int:
    from studio.runs.queue import JobManager

    config = load_run_config(args.config, args.set)
    jobs = JobManager.of(Workspace.from_env())
    run = jobs.submit(config)
    print(f"run {run.id}: {run.status.value}  (dir {run.run_dir})")
    if args.detach:
        return 0
    return follow(jobs, run.id)


# -- runs ---------------------------------------------------------------------------------------
def cmd_runs(args: argparse.Namespace) -> int:
    from studio.core.store import iso
    from studio.runs.queue import JobManager

    jobs = JobManager.of(Workspace.from_env())
    runs = jobs.store.list_runs()
    if args.json:
        print(json.dumps([r.to_dict() for r in runs], indent=2, default=str))
        return 0
    if not runs:
        print("No runs yet. Start one: studio train quick-demo")
        return 0
    print(f"{'id':44} {'stage':5} {'status':11} {'step':>9} {'loss':>8} {'dataset':20} created")
    for r in runs:
        loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "-"
        stage = str(r.config.get("stage") or "sft")
        print(
            f"{r.id:44} {stage:5} {r.status.value:11} {f'{r.step}/{r.total_steps}':>9} {loss:>8} "
            f"{r.datasets[:20]:20} {iso(r.created_at)}"
        )
    return 0


def cmd_run_show(args: argparse.Namespace) -> int:
    from studio.runs.queue import JobManager

    jobs = JobManager.of(Workspace.from_env())
    run = jobs.store.get_run(args.run)
    print(json.dumps(run.to_dict(), indent=2, default=str))
    if args.log:
        print(jobs.log_tail(run.id, args.log))
    return 0


def cmd_abort(args: argparse.Namespace) -> int:
    from studio.runs.queue import JobManager

    run = JobManager.of(Workspace.from_env()).abort(args.run)
    print(f"run {run.id}: {run.status.value} (abort requested)")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from studio.runs.queue import JobManager

    jobs = JobManager.of(Workspace.from_env())
    run = jobs.resume(args.run, args.checkpoint)
    print(f"run {run.id}: {run.status.value}, from {run.resume_from or 'the start'}")
    return 0 if args.detach else follow(jobs, run.id)


def cmd_delete(args: argparse.Namespace) -> int:
    from studio.runs.queue import JobManager

    JobManager.of(Workspace.from_env()).delete(args.run)
    print(f"deleted {args.run}")
    return 0


# -- datasets -----------------------------------------------------------------------------------
def cmd_datasets(args: argparse.Namespace) -> int:
    if args.action == "doctor":
        from studio.cli.audit import run_cli

        return run_cli(args)
    from studio.data import DatasetRegistry

    registry = DatasetRegistry(Workspace.from_env().home)
    if args.action == "list":
        entries = registry.list()
        if args.json:
            print(json.dumps([e.to_dict() for e in entries], indent=2))
            return 0
        print(f"{'name':24} {'format':10} {'rows':>6}  source")
        for e in entries:
            print(f"{e.name:24} {e.format:10} {e.rows:>6}  {'(bundled) ' if e.bundled else ''}{e.source}")
        return 0
    if args.action == "show":
        entry = registry.get(args.name)
        print(json.dumps(entry.to_dict(), indent=2))
        return 0
    if args.action == "add":
        from studio.data import CleanOptions

        cmap = json.loads(args.columns) if args.columns else None
        clean_opts = CleanOptions(min_answer_chars=args.min_answer_chars, max_answer_chars=args.max_answer_chars)
        entry, report, clean = registry.add(
            args.name,
            Path(args.path),
            fmt=args.format,
            column_map=cmap,
            description=args.description or "",
            skip_invalid=args.skip_invalid,
            clean=clean_opts,
        )
        print(f"registered '{entry.name}': {entry.rows} rows, format {entry.format}")
        for issue in report.warnings[:20]:
            print(f"  warning row {issue.row}: {issue.reason}")
        print(f"  cleaning: {clean}")
        return 0
    if args.action == "remove":
        registry.remove(args.name)
        print(f"removed '{args.name}'")
        return 0
    if args.action == "import":
        from studio.data import import_dataset_info

        report = import_dataset_info(registry, Path(args.path))
        for name in report.registered:
            print(f"registered {name}")
        for name, reason in report.skipped:
            print(f"skipped {name}: {reason}")
        return 0 if report.registered or not report.skipped else 1
    raise UsageError(f"unknown datasets action {args.action}")


# -- export -------------------------------------------------------------------------------------
def _emit(kind: str, message: str, **fields) -> None:
    """One JSON object on one line of stdout (`studio export --json`): progress, result or error."""
    print(json.dumps({"type": kind, "message": message, **fields}, default=str), flush=True)


def _silent(message: str) -> None:
    """Progress without --json: none (the output stays what it always was)."""


def cmd_export(args: argparse.Namespace) -> int:
    """Without --json: the saved files, then the zip. With --json: one JSON object per line, `progress`
    objects while it works, then one `result` (out_dir, files, zip) or one `error` (message, code); an
    error also goes to stderr as always."""
    try:
        return _export(args, _emit if args.json else None)
    except Exception as err:
        if args.json:
            known = isinstance(err, StudioError)
            message = err.one_line() if known else f"{type(err).__name__}: {err}"
            _emit("error", message, code=int(err.exit_code) if known else 1)
        raise


def _export(args: argparse.Namespace, emit) -> int:
    from studio.reports.export import export_adapter, find_adapter, merge_adapter, zip_folder

    progress = functools.partial(emit, "progress") if emit else _silent
    if not args.merge and not args.adapter:
        raise UsageError("say what to export: --merge OUT_DIR (merged model) or --adapter OUT_DIR")
    progress(f"Finding the adapter of {args.run}")
    adapter = find_adapter(args.run, Workspace.from_env().home)
    if args.merge:
        progress(f"Loading the base model ({args.dtype}) and merging the adapter into it")
        result = merge_adapter(adapter, Path(args.merge), dtype=args.dtype, overwrite=args.overwrite)
    else:
        progress("Copying the adapter")
        result = export_adapter(adapter, Path(args.adapter), overwrite=args.overwrite)
    if emit is None:
        print(result.describe())
    zip_path = None
    if args.zip:
        progress("Writing the zip")
        zip_path = zip_folder(result.out_dir, result.out_dir.with_suffix(".zip"))
        if emit is None:
            print(f"zip: {zip_path}")
    if emit is not None:
        emit("result", result.describe(), out_dir=result.out_dir, files=result.files, zip=zip_path)
    return 0


# -- plan ---------------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    """Exit 0 when the run fits (or the free memory is unknown), 1 when it does not."""
    from studio.core.allocator import choose_allocator
    from studio.model.loading import load_config, resolve_model
    from studio.model.memory import (
        allocator_caveat,
        device_free_memory,
        model_shapes,
        plan_device,
        plan_memory,
        report_text,
        suggestions,
    )

    config = load_run_config(args.config, args.set)
    device = args.device or plan_device(config.train.device)
    model_config = load_config(resolve_model(config.model.source), config.model.trust_remote_code)
    shapes = model_shapes(model_config)
    plan = plan_memory(model_config, config, device, shapes)
    available = device_free_memory(device)
    fits = plan.fits(available)
    tips = suggestions(model_config, config, available, device, shapes) if fits is False else []
    print(report_text(plan, available, tips, allocator_caveat(device, choose_allocator().name)))
    return 1 if fits is False else 0


# -- misc ---------------------------------------------------------------------------------------
def cmd_presets(args: argparse.Namespace) -> int:
    from studio.core.presets import list_presets

    for p in list_presets():
        print(f"{p.name:22} {p.description}")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from studio.core.config import LoraSpec
    from studio.model.loading import inspect_model

    lora = LoraSpec(r=args.r, target_modules=args.targets)
    info = inspect_model(args.source, lora)
    count = info.pop("lora_parameters")
    print(json.dumps(info, indent=2))
    print(f"LoRA r={args.r} on {args.targets}: {count.describe()}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from studio.cli.doctor import run_doctor

    return run_doctor(Workspace.from_env().home, do_repair=args.repair, as_json=args.json)


def cmd_serve(args: argparse.Namespace) -> int:
    from studio.core.security import AccessError, load_auth, serve_policy
    from studio.model.loading import bundled_model_ready
    from studio.ui.app import default_roots, launch

    home = Workspace.from_env().home
    try:
        policy = serve_policy(
            args.host, load_auth(args.auth, args.auth_file), args.insecure, [*default_roots(home), *args.allow_root]
        )
    except AccessError as err:
        raise UsageError(str(err)) from err
    if not bundled_model_ready():
        print(
            "Preparing the bundled model in the background (first start, about a minute); the page works meanwhile.",
            flush=True,
        )
    return launch(home, host=policy.host, port=args.port, auth=policy.auth, allowed_roots=policy.allowed_roots)


def cmd_join(args: argparse.Namespace) -> int:
    from studio.core.workspace import ensure_home
    from studio.runs.worker import join

    home = ensure_home(Workspace.from_env().home)
    return join(load_run_config(args.config, args.set), home, args.machine_rank, announce=print)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="studio", description="LoRA Studio: fine-tune language models with LoRA/QLoRA.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="open the studio in the browser")
    s.add_argument("--host", default=os.environ.get("STUDIO_HOST", "127.0.0.1"))
    s.add_argument("--port", type=int, default=int(os.environ.get("STUDIO_PORT", "7860")))
    s.add_argument("--auth", help="user:password (several: u1:p1,u2:p2); or set STUDIO_AUTH")
    s.add_argument("--auth-file", help="a file of user:password lines; or set STUDIO_AUTH_FILE")
    s.add_argument("--insecure", action="store_true", help="allow a non-local --host without authentication")
    s.add_argument(
        "--allow-root",
        action="append",
        default=[],
        metavar="DIR",
        help="on a non-local host, a folder whose model/dataset paths the page may read (besides STUDIO_HOME)",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("train", help="train headless from a config file or preset")
    s.add_argument("config", help="a run config YAML, or a preset name (quick-demo)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_steps=10")
    s.add_argument("--detach", action="store_true", help="queue it and return at once")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("join", help="take part from this machine in a several-machine run machine 0 started")
    s.add_argument("config", help="the run's config (the same file machine 0 trains)")
    s.add_argument("--machine-rank", type=int, required=True, help="this machine's number: 1, 2, ...")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.seed=1")
    s.set_defaults(func=cmd_join)

    s = sub.add_parser("runs", help="list runs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("run", help="show one run")
    s.add_argument("run")
    s.add_argument("--log", type=int, default=0, metavar="N", help="also print the last N log lines")
    s.set_defaults(func=cmd_run_show)

    s = sub.add_parser("abort", help="abort a queued or running run (it saves a checkpoint)")
    s.add_argument("run")
    s.set_defaults(func=cmd_abort)

    s = sub.add_parser("resume", help="resume an interrupted, aborted or failed run from its checkpoint")
    s.add_argument("run")
    s.add_argument("--checkpoint", help="a checkpoint name, e.g. checkpoint-20 (default: the newest complete)")
    s.add_argument("--detach", action="store_true")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("delete", help="delete a finished run and its files")
    s.add_argument("run")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("datasets", help="list, add, show, remove or import datasets")
    dsub = s.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("list")
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("show")
    d.add_argument("name")
    d = dsub.add_parser("add")
    d.add_argument("path")
    d.add_argument("--name", required=True)
    d.add_argument(
        "--format",
        choices=DATASET_FORMATS,
        default=None,
        help="default: detected from the columns; preference (chosen/rejected pairs) and kto (labelled answers) "
        "are for preference runs",
    )
    d.add_argument("--columns", help='column map as JSON, e.g. {"instruction": "question", "output": "answer"}')
    d.add_argument("--description")
    d.add_argument("--skip-invalid", action="store_true", help="drop bad rows (reported) instead of refusing")
    d.add_argument("--min-answer-chars", type=int, default=1, help="cleaning: drop rows with a shorter answer")
    d.add_argument("--max-answer-chars", type=int, help="cleaning: drop rows with a longer answer")
    d = dsub.add_parser("remove")
    d.add_argument("name")
    d = dsub.add_parser("import", help="import a LLaMA-Factory data folder's dataset_info.json")
    d.add_argument("path")
    from studio.cli.audit import add_arguments as add_doctor_arguments

    d = dsub.add_parser(
        "doctor",
        help="find near-duplicates, conflicts, outliers, missing EOS and leakage; --fix registers a clean copy",
    )
    add_doctor_arguments(d)
    s.set_defaults(func=cmd_datasets)

    s = sub.add_parser("export", help="merge a run's adapter into its base, or copy the adapter")
    s.add_argument("run", help="a run id or an adapter folder")
    s.add_argument("--merge", metavar="OUT_DIR")
    s.add_argument("--adapter", metavar="OUT_DIR")
    s.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    s.add_argument("--zip", action="store_true", help="also write OUT_DIR.zip")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--json", action="store_true", help="report as JSON lines: progress, then a result or an error")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("plan", help="estimate a run's peak memory and whether it fits (no weights loaded)")
    s.add_argument("config", help="a run config YAML, or a preset name (quick-demo)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. lora.r=8")
    s.add_argument("--device", choices=["cpu", "cuda"], help="default: the config's device (auto: CUDA if visible)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("presets", help="list presets")
    s.set_defaults(func=cmd_presets)

    s = sub.add_parser("doctor", help="check the workspace (runs, store, datasets) and optionally repair it")
    s.add_argument("--repair", action="store_true", help="fix what can be fixed safely (moves leftovers to trash/)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_doctor)

    from studio.cli import card, sweep
    from studio.cli import evaluate as evaluation

    s = sub.add_parser("eval", help="evaluate a finished run: loss, perplexity and answers, base vs adapter")
    evaluation.add_arguments(s)
    s.set_defaults(func=evaluation.run_cli)

    s = sub.add_parser("sweep", help="scan a parameter with short runs, compare them, train the pick longer")
    sweep.add_arguments(s)

    s = sub.add_parser("card", help="write a run's Markdown card (README.md beside the adapter, curves as SVG)")
    card.add_arguments(s)
    s.set_defaults(func=card.run_cli)

    s = sub.add_parser("model", help="inspect a model: linear layers and LoRA parameter count (no weights loaded)")
    s.add_argument("source", nargs="?", default="bundled")
    s.add_argument("--r", type=int, default=16)
    s.add_argument("--targets", default="all-linear")
    s.set_defaults(func=cmd_model)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    return exits_cleanly(args.func)(args)


if __name__ == "__main__":
    sys.exit(main())
