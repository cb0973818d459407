"""`studio doctor`: check that the workspace's files and the run store agree, and repair what is safe.

A run is a directory plus a store row; a dataset is a folder plus its entry.json and a content hash. A
crash, a killed worker or a hand edit can leave the two halves apart. check() reports every such case
as a Finding; repair() fixes the repairable ones. Nothing is deleted outright: leftovers are moved to
STUDIO_HOME/trash/<time>/, and a store row removed for want of files is written there as JSON first.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from studio.core.store import RunStatus, Store
from studio.core.workspace import RunDir, datasets_dir, db_path, ensure_home, runs_dir

TRASH = "trash"
TEMP_PREFIXES = (".tmp", ".export-", ".convert-", ".adding-", ".removing-", ".write-test-")
TEMP_MAX_AGE_S = 3600  # younger ones may belong to a registration or export still in progress


@dataclass(frozen=True)
class Finding:
    kind: str  # one of the check names below
    subject: str  # a run id, a dataset name or a path
    detail: str  # what is wrong
    fix: str  # what repair() does, or what the user should do
    repairable: bool

    def describe(self) -> str:
        return f"[{self.kind}] {self.subject}: {self.detail} Fix: {self.fix}"


# -- checks: each a small function of (home, store) -> findings ----------------------------------------


def check_run_dirs(home: Path, store: Store) -> list[Finding]:
    """Run directories with no row (orphans) and rows with no directory."""
    runs = {r.id: r for r in store.list_runs()}
    found = []
    root = runs_dir(home)
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []:
        if d.name not in runs:
            found.append(
                Finding("orphan-run-dir", d.name, f"{d} has no row in the run store.", "move it to trash/", True)
            )
    from studio.core.procs import process_alive

    for run in runs.values():
        if Path(run.run_dir).is_dir():
            continue
        # Without its directory a run has no config, checkpoints or adapter: nothing to resume or use. The row
        # goes, but its record and config are kept in trash/ so it can be trained again with `studio train`.
        live = run.status == RunStatus.RUNNING and process_alive(run.pid, run.pid_started)
        fix = (
            f"abort it (studio abort {run.id}), then run `studio doctor --repair`"
            if live
            else "remove the row; its record and config.yaml are kept in trash/ (`studio train` that file to redo it)"
        )
        found.append(
            Finding(
                "missing-run-dir", run.id, f"{run.status.value} run's directory {run.run_dir} is gone.", fix, not live
            )
        )
    return found


def check_stuck_running(home: Path, store: Store) -> list[Finding]:
    from studio.core.procs import process_alive

    return [
        Finding(
            "stuck-running",
            run.id,
            f"marked running, but its worker (pid {run.pid}) is gone.",
            "mark it interrupted, so it can be resumed from its last checkpoint",
            True,
        )
        for run in store.list_runs(RunStatus.RUNNING)
        if Path(run.run_dir).is_dir() and not process_alive(run.pid, run.pid_started)
    ]


def check_completed_adapters(home: Path, store: Store) -> list[Finding]:
    return [
        Finding(
            "missing-adapter",
            run.id,
            f"completed, but its adapter files are missing from {RunDir.of(run).adapter}.",
            "mark it failed with the reason; its checkpoints stay, so `studio resume` can finish it",
            True,
        )
        for run in store.list_runs(RunStatus.COMPLETED)
        if Path(run.run_dir).is_dir() and not RunDir.of(run).has_adapter()
    ]


def check_queued_configs(home: Path, store: Store) -> list[Finding]:
    return [
        Finding(
            "queued-no-config",
            run.id,
            f"queued, but {RunDir.CONFIG} is missing from its directory; its worker would fail at once.",
            f"write {RunDir.CONFIG} again from the copy kept in the run store",
            True,
        )
        for run in store.queued_runs()
        if Path(run.run_dir).is_dir() and not RunDir.of(run).config.is_file()
    ]


def check_datasets(home: Path, store: Store) -> list[Finding]:
    """Stored files whose content changed since registration, and folders without an entry.json."""
    from studio.data import DataError, DatasetRegistry
    from studio.data.registry import ENTRY_FILE, file_sha256

    registry = DatasetRegistry(home)
    root = datasets_dir(home)
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []:
        if not (d / ENTRY_FILE).is_file():
            found.append(
                Finding(
                    "dataset-no-entry",
                    d.name,
                    f"{d} has no {ENTRY_FILE} (left over from an interrupted registration).",
                    "move it to trash/",
                    True,
                )
            )
            continue
        fix = f"remove it (studio datasets remove {d.name}) and register the original file again"
        try:
            entry = registry.get(d.name)
            path = registry.path_of(entry)
        except DataError as err:
            found.append(Finding("dataset-damaged", d.name, str(err), fix, False))
            continue
        if not path.is_file():
            found.append(Finding("dataset-file-missing", d.name, f"its stored file {path} is missing.", fix, False))
        elif file_sha256(path) != entry.sha256:
            found.append(
                Finding(
                    "dataset-hash-mismatch",
                    d.name,
                    f"its stored file {path.name} changed since registration (sha256 differs from the entry).",
                    fix,
                    False,
                )
            )
    return found


def _temp_roots(home: Path) -> list[Path]:
    from studio.core.workspace import models_cache_dir

    roots = [home, *(p for p in home.iterdir() if p.is_dir() and p.name != TRASH and not p.name.startswith("."))]
    cache = models_cache_dir(home)
    return [*roots, cache] if cache.is_dir() and cache not in roots else roots


def check_temp_leftovers(home: Path, store: Store, now: float | None = None) -> list[Finding]:
    now = time.time() if now is None else now
    found = []
    for root in _temp_roots(home):
        for p in sorted(root.iterdir()):
            if p.name.startswith(TEMP_PREFIXES) and now - p.lstat().st_mtime > TEMP_MAX_AGE_S:
                age_h = (now - p.lstat().st_mtime) / 3600
                found.append(
                    Finding(
                        "temp-leftover",
                        str(p),
                        f"temporary {'folder' if p.is_dir() else 'file'} {age_h:.0f} h old, left by an "
                        "interrupted registration, export or conversion.",
                        "move it to trash/",
                        True,
                    )
                )
    return found


CHECKS = (
    check_run_dirs,
    check_stuck_running,
    check_completed_adapters,
    check_queued_configs,
    check_datasets,
    check_temp_leftovers,
)


def check(home: Path) -> list[Finding]:
    """Every problem in the workspace, changing nothing."""
    home = ensure_home(Path(home))
    store = Store(db_path(home))
    try:
        return [f for c in CHECKS for f in c(home, store)]
    finally:
        store.close()


# -- repairs ------------------------------------------------------------------------------------------


def trash_dir(home: Path) -> Path:
    return home / TRASH / time.strftime("%Y%m%d-%H%M%S")


def move_to_trash(home: Path, path: Path, trash: Path) -> Path:
    """Move `path` under trash/<time>/, keeping its place relative to the workspace when it has one."""
    try:
        rel = path.resolve().relative_to(home.resolve())
    except ValueError:
        rel = Path(path.name)
    target = trash / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(target))
    return target


def _do_repairone(home: Path, finding: Finding, store: Store, trash: Path) -> str:
    kind, subject = finding.kind, finding.subject
    if kind == "orphan-run-dir":
        return f"moved {subject} to {move_to_trash(home, runs_dir(home) / subject, trash)}"
    if kind in ("dataset-no-entry",):
        return f"moved {subject} to {move_to_trash(home, datasets_dir(home) / subject, trash)}"
    if kind == "temp-leftover":
        return f"moved {subject} to {move_to_trash(home, Path(subject), trash)}"
    if kind == "missing-run-dir":
        from studio.core.config import RunConfig

        run = store.get_run(subject)
        trash.mkdir(parents=True, exist_ok=True)
        (trash / f"run-{run.id}.json").write_text(json.dumps(run.to_dict(), indent=2, default=str))
        (trash / f"run-{run.id}.yaml").write_text(RunConfig.from_dict(run.config).to_yaml())
        store.delete_run(run.id)
        return f"removed the row of {run.id} (record and config kept in {trash})"
    if kind == "stuck-running":
        from studio.runs.queue import JobManager

        JobManager(home).reconcile()
        return f"marked {subject} {store.get_run(subject).status.value}"
    if kind == "missing-adapter":
        # completed -> failed is no legal transition for a worker; the doctor sets it directly, on purpose
        store.update_run(
            subject,
            status=RunStatus.FAILED.value,
            error="The adapter files of this completed run are missing (studio doctor). Resume it to train again "
            "from its last checkpoint, or delete it.",
        )
        return f"marked {subject} failed (adapter missing); resume it with `studio resume {subject}`"
    if kind == "queued-no-config":
        from studio.core.config import RunConfig

        run = store.get_run(subject)
        RunConfig.from_dict(run.config).save(RunDir.of(run).config)
        return f"wrote {RunDir.CONFIG} of {subject} again from the run store"
    raise ValueError(f"no repair for {kind}")


def repair(home: Path, findings: list[Finding]) -> list[str]:
    """Fix the repairable findings; returns one line per action taken."""
    home = ensure_home(Path(home))
    store = Store(db_path(home))
    trash = trash_dir(home)
    done = []
    try:
        for finding in findings:
            if finding.repairable:
                done.append(_do_repairone(home, finding, store, trash))
    finally:
        store.close()
    return done
