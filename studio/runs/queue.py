"""The queue and its supervisor: submit, start, abort, resume, and find runs whose worker died.

State lives in the store, not in this object, so the web server, the CLI and every worker see one
queue; a file lock keeps two schedulers from starting the same run. A finishing worker schedules the
next queued run itself, so the queue moves on with no server running.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.core import procs
from studio.core.config import ConfigError, RunConfig, parse_gpu_ids
from studio.core.errors import ExitCode, StudioError
from studio.core.procs import process_alive, process_start_token
from studio.core.store import Run, RunNotFound, RunStatus, Store, Sweep
from studio.core.workspace import (
    RunDir,
    Workspace,
    checkpoint_problem,
    checkpoint_step,
    db_path,
    ensure_home,
    runs_dir,
)
from studio.runs.preflight import run_problems, sweep_problems
from studio.runs.sweep import (
    Pick,
    SweepError,
    SweepParam,
    SweepRow,
    alpha_follows_rank,
    as_steps,
    expand,
    format_values,
    long_run_config,
    recommend,
    run_suffix,
    summarize,
)
from studio.training.launch import (
    ASSIGNED_ENV,
    DeviceRequest,
    device_request,
    pick_devices,
    visible_gpus,
)

SPAWNED_ENV = "STUDIO_WORKER_SPAWNED"  # set by the queue: the worker waits for its row, never claims it


class JobError(StudioError, RuntimeError):
    """A queue action that cannot be done; the message says why."""

    exit_code = ExitCode.FAILED


def _gpu_ids(devices: str | None) -> list[int]:
    try:
        return parse_gpu_ids(devices)
    except ValueError:
        return []


def make_run_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:32] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{secrets.token_hex(4)}"


def check_workspace(home: Path, min_free_mb: float = Workspace.min_free_mb) -> None:
    """Refuse a start that would die mid-run for want of a writable, roomy workspace."""
    # Unique per call: two starts in one server process at once must not remove each other's probe.
    probe = home / "runs" / f".write-test-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise JobError(
            f"The workspace {home} is not writable ({err.strerror}). Fix its permissions or set "
            "STUDIO_HOME to a writable folder."
        ) from err
    free, need = shutil.disk_usage(home).free, int(min_free_mb * 2**20)
    if free < need:
        raise JobError(
            f"Only {free / 2**20:.0f} MiB free on the disk of {home}; a run needs at least "
            f"{need / 2**20:.0f} MiB for checkpoints. Free some space or move STUDIO_HOME."
        )


def read_run_json(run: Run) -> dict | None:
    """RUN_DIR/adapter/run.json (written last by a completed run), or None when absent or unreadable."""
    path = RunDir.of(run).run_json
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _no_pick_message(sweep_id: str, rows: list[SweepRow]) -> str:
    if not rows:
        return f"Sweep {sweep_id} has no scan runs left (they were deleted): start a new sweep."
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    states = ", ".join(f"{n} {status}" for status, n in counts.items())
    if any(row.status in (RunStatus.QUEUED, RunStatus.RUNNING) for row in rows):
        return (
            f"No scan run of sweep {sweep_id} has completed yet ({states}); promote once one has "
            f"(watch with `studio sweep show {sweep_id}`)."
        )
    return (
        f"No scan run of sweep {sweep_id} completed ({states}): see why with `studio run RUN --log 40`, "
        "fix the cause and start a new sweep."
    )


@dataclass
class JobManager:
    home: Path
    slots: int = Workspace.slots  # CPU runs at once; GPU runs take one of the GPUs instead
    min_free_mb: float = Workspace.min_free_mb  # refuse a start with less room on the disk than this
    _store: Store | None = field(default=None, init=False, repr=False)
    _children: dict[int, subprocess.Popen] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.home = ensure_home(Path(self.home))
        self.reconcile()

    @classmethod
    def of(cls, workspace: Workspace) -> JobManager:
        """The queue of a workspace, with its settings."""
        return cls(workspace.home, workspace.slots, workspace.min_free_mb)

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(db_path(self.home))
        return self._store

    def run_dir(self, run_id: str) -> Path:
        return runs_dir(self.home) / run_id

    @contextmanager
    def _lock(self):
        with open(self.home / ".queue.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- submitting ---------------------------------------------------------------------------
    def submit(self, config: RunConfig, start: bool = True, sweep_id: str | None = None) -> Run:
        """Validate, create the run directory and its row (queued), and start it if a slot is free."""
        problems = run_problems(config, self.home)
        if problems:
            raise ConfigError(problems)
        check_workspace(self.home, self.min_free_mb)
        run_id = self._new_run_dir(config.name or "run")
        run_dir = self.run_dir(run_id)
        try:
            config.save(RunDir(run_dir).config)
            run = self.store.create_run(run_id, config.name or run_id, config.to_dict(), str(run_dir), sweep_id)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if start:
            self.schedule()
        return self.store.get_run(run.id)

    # -- sweeps -------------------------------------------------------------------------------
    def submit_sweep(
        self, base: RunConfig, params: list[SweepParam], scan_steps: int, name: str
    ) -> tuple[Sweep, list[Run]]:
        """Validate every scan run first (values, datasets, model and targets), then create the sweep and
        queue all its runs in one store transaction, cheapest first: a bad 3rd value queues nothing, and
        the queue (oldest first) trains them one after another in scan order."""
        name = name or base.name or "sweep"
        scan_steps = as_steps(scan_steps)
        plan = expand(base, params, scan_steps, name)  # raises SweepError listing every problem
        problems = sweep_problems([config for _, config in plan], self.home)
        if problems:
            raise SweepError(problems)
        check_workspace(self.home, self.min_free_mb)
        sweep_id = make_run_id(f"sweep {name}")
        entries: list[tuple[str, str, dict[str, Any], str]] = []
        try:
            for _, config in plan:
                run_id = self._new_run_dir(config.name)
                config.save(RunDir(self.run_dir(run_id)).config)
                entries.append((run_id, config.name, config.to_dict(), str(self.run_dir(run_id))))
            sweep = self.store.create_sweep(
                sweep_id, name, base.to_dict(), [p.to_dict() for p in params], scan_steps, entries
            )
        except BaseException:
            for run_id, *_ in entries:
                shutil.rmtree(self.run_dir(run_id), ignore_errors=True)
            raise
        for i, ((values, config), (run_id, *_)) in enumerate(zip(plan, entries, strict=True), 1):
            alpha = f" (lora.alpha {config.lora.alpha:g}, scaled with r)" if alpha_follows_rank(values, config) else ""
            self.store.add_event(
                run_id,
                f"Scan run {i}/{len(plan)} of sweep {sweep.id}: {format_values(values)}{alpha}, {scan_steps} steps",
            )
        self.schedule()
        return sweep, [self.store.get_run(run_id) for run_id, *_ in entries]

    def _new_run_dir(self, name: str) -> str:
        """A fresh run id and its directory; runs named alike within one second get another id."""
        while True:
            run_id = make_run_id(name)
            try:
                self.run_dir(run_id).mkdir(parents=True)
            except FileExistsError:
                continue
            return run_id

    def sweep_summary(self, sweep_id: str) -> tuple[Sweep, list[SweepRow], Pick | None]:
        """The sweep, one row per scan run still in the store (scan order), and the recommended pick."""
        sweep = self.store.get_sweep(sweep_id)
        runs = self.store.runs_of_sweep(sweep_id, include_long=False)
        metrics = {r.id: self.store.metrics(r.id) for r in runs}
        run_json = {r.id: read_run_json(r) for r in runs}
        rows = summarize(runs, metrics, run_json, paths=[p["path"] for p in sweep.params])
        return sweep, rows, recommend(rows)

    def promote_sweep(self, sweep_id: str) -> Run:
        """Queue the long run from the sweep's pick: the base config's own epochs/max_steps with the
        pick's values. Refused while no scan run has completed, and when the long run exists already."""
        # Under the queue lock, so two clicks cannot both start a long run (submit(start=False) does not
        # take the lock itself; schedule, which does, runs after it is released).
        with self._lock():
            sweep, rows, pick = self.sweep_summary(sweep_id)
            existing = self._long_run(sweep)
            if existing is not None:
                raise JobError(
                    f"Sweep {sweep.id} already has its long run: {existing.id} ({existing.status.value}). "
                    f"Follow it with `studio run {existing.id}`, or delete it to start another."
                )
            if pick is None:
                raise JobError(_no_pick_message(sweep.id, rows))
            base = RunConfig.from_dict(sweep.base_config)
            config = long_run_config(base, pick.values, "")
            config.name = f"{sweep.name}-long-{run_suffix(pick.values, config)}"
            run = self.submit(config, start=False, sweep_id=sweep.id)
            self.store.set_sweep_long_run(sweep.id, run.id)
        self.store.add_event(
            run.id, f"Long run of sweep {sweep.id} from its pick {format_values(pick.values)}: {pick.reason}"
        )
        self.schedule()
        return self.store.get_run(run.id)

    def _long_run(self, sweep: Sweep) -> Run | None:
        if not sweep.long_run_id:
            return None
        try:
            return self.store.get_run(sweep.long_run_id)
        except RunNotFound:  # deleted: a new long run may be started
            return None

    # -- scheduling ---------------------------------------------------------------------------
    def schedule(self) -> list[str]:
        """Start queued runs, oldest first, while their devices are free: CPU runs take one of `slots`,
        GPU runs the GPUs they ask for, disjoint from every running run's. A run that does not fit waits
        and a later one that fits may start meanwhile. Returns the ids started."""
        started: list[str] = []
        with self._lock():
            self._reconcile_locked()
            gpus = visible_gpus()
            held = [_gpu_ids(run.devices) for run in self.store.list_runs(RunStatus.RUNNING)]
            used = {i for ids in held for i in ids}
            cpu_busy = sum(1 for ids in held if not ids)
            for run in self.store.queued_runs():
                request = self._request(run, bool(gpus))
                if request.gpus == 0:
                    if cpu_busy >= self.slots:
                        continue
                    cpu_busy += 1
                    ids: tuple[int, ...] = ()
                else:
                    picked = pick_devices(request, [g for g in gpus if g not in used])
                    if picked is None:
                        continue
                    ids = picked
                    used.update(ids)
                self._spawn(run, ids)
                started.append(run.id)
        return started

    @staticmethod
    def _request(run: Run, have_gpus: bool) -> DeviceRequest:
        try:
            config = RunConfig.from_dict(run.config)
        except ConfigError:  # a row from an older version that no longer reads: its worker will say why
            return DeviceRequest(0)
        return device_request(config, have_gpus)

    def _spawn(self, run: Run, gpu_ids: tuple[int, ...] = ()) -> None:
        run_dir = Path(run.run_dir)
        cmd = procs.python_command("studio.runs.worker", str(run_dir))
        env = procs.python_env(self.home)
        env[SPAWNED_ENV] = "1"
        devices = ",".join(str(i) for i in gpu_ids) if gpu_ids else "cpu"
        if gpu_ids:
            # One process sees only its GPU; a launched run passes the ids to accelerate (--gpu_ids).
            env[ASSIGNED_ENV] = devices
            env["CUDA_VISIBLE_DEVICES"] = devices
        with open(RunDir(run_dir).log, "ab") as log:  # its own session: closing the UI does not stop it
            proc = procs.spawn(cmd, env, stdout=log, stderr=subprocess.STDOUT, text=False)
        self._children[proc.pid] = proc
        self.store.transition(
            run.id, RunStatus.RUNNING, pid=proc.pid, pid_started=process_start_token(proc.pid), devices=devices
        )
        where = f"GPU {devices}" if gpu_ids else "CPU"
        self.store.add_event(run.id, f"Worker started (pid {proc.pid}) on {where}")

    def reconcile(self) -> list[str]:
        with self._lock():
            return self._reconcile_locked()

    def _reconcile_locked(self) -> list[str]:
        """Runs marked running whose worker is gone become interrupted (resumable)."""
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]
        marked = []
        for run in self.store.list_runs(RunStatus.RUNNING):
            if process_alive(run.pid, run.pid_started):
                continue
            ckpt = self.resumable_checkpoint(run.id)
            where = f"resume from {ckpt.name}" if ckpt else "no checkpoint was saved yet; resume restarts it"
            self.store.transition(
                run.id,
                RunStatus.INTERRUPTED,
                error=f"The worker process (pid {run.pid}) ended without reporting (killed, or the machine "
                f"restarted); {where}.",
            )
            self.store.add_event(run.id, "Marked interrupted: worker process gone", "warning")
            marked.append(run.id)
        return marked

    # -- control ------------------------------------------------------------------------------
    def abort(self, run_id: str) -> Run:
        """A queued run is dropped from the queue; a running one is asked to save and stop (SIGTERM)."""
        run = self.store.get_run(run_id)
        if run.status == RunStatus.QUEUED:
            return self.store.transition(run_id, RunStatus.ABORTED, error="Aborted before it started.")
        if run.status != RunStatus.RUNNING:
            raise JobError(f"Run {run_id} is {run.status.value}; only queued or running runs can be aborted.")
        if process_alive(run.pid, run.pid_started):
            RunDir(run.run_dir).abort_request.write_text(f"{time.time():.3f}\n")  # first, so no stop is lost
            os.kill(run.pid, signal.SIGTERM)
            self.store.add_event(run_id, "Abort requested: saving a checkpoint, then stopping")
        else:
            self.reconcile()
        return self.store.get_run(run_id)

    def checkpoints(self, run_id: str) -> list[tuple[Path, str | None]]:
        """Every checkpoint of a run, newest first, with why it cannot be used (None if it can)."""
        return [(path, checkpoint_problem(path)) for path in RunDir(self.run_dir(run_id)).checkpoint_dirs()]

    def resumable_checkpoint(self, run_id: str) -> Path | None:
        return RunDir(self.run_dir(run_id)).latest_checkpoint()

    def resume(self, run_id: str, checkpoint: str | None = None) -> Run:
        """Queue a stopped run again, continuing from its newest complete checkpoint (or the one named)."""
        run = self.store.get_run(run_id)
        if run.status not in (RunStatus.INTERRUPTED, RunStatus.ABORTED, RunStatus.FAILED):
            raise JobError(f"Run {run_id} is {run.status.value}; only interrupted, aborted or failed runs resume.")
        found = self.checkpoints(run_id)
        usable = [p.name for p, problem in found if problem is None]
        if checkpoint:
            path = RunDir(self.run_dir(run_id)).checkpoints / Path(checkpoint).name
            problem = checkpoint_problem(path) if path.is_dir() else "it does not exist"
            if problem:
                raise JobError(
                    f"Checkpoint {path.name} cannot be resumed from: {problem}. "
                    f"Usable checkpoints: {', '.join(usable) or 'none (resume restarts the run)'}."
                )
        else:
            path = self.resumable_checkpoint(run_id)
        # Newer checkpoints that are damaged are passed over, and the user is told which and why.
        skipped = [
            f"{p.name} ({problem})"
            for p, problem in found
            if problem and (path is None or checkpoint_step(p) > checkpoint_step(path))
        ]
        step = checkpoint_step(path) if path else 0
        RunDir(run.run_dir).abort_request.unlink(missing_ok=True)  # the old request must not stop the resumed run
        self.store.truncate_metrics(run_id, step)
        self.store.transition(run_id, RunStatus.QUEUED, resume_from=str(path) if path else None)
        if skipped:
            self.store.add_event(
                run_id,
                f"Damaged checkpoint(s) skipped: {'; '.join(skipped)}. Resuming from the previous one.",
                "warning",
            )
        self.store.add_event(run_id, f"Resume queued from {path.name if path else 'the start'}")
        self.schedule()
        return self.store.get_run(run_id)

    def delete(self, run_id: str) -> None:
        run = self.store.get_run(run_id)
        if run.status in (RunStatus.RUNNING, RunStatus.QUEUED):
            raise JobError(f"Run {run_id} is {run.status.value}: abort it before deleting.")
        run_dir = Path(run.run_dir).resolve()
        if run_dir.parent != runs_dir(self.home).resolve():
            raise JobError(f"Refusing to delete {run_dir}: it is not inside the workspace's runs folder.")
        shutil.rmtree(run_dir, ignore_errors=True)
        self.store.delete_run(run_id)
        if run.sweep_id:  # the sweep row stays; a deleted long run may be promoted again
            try:
                sweep = self.store.get_sweep(run.sweep_id)
            except KeyError:
                return
            if sweep.long_run_id == run_id:
                self.store.set_sweep_long_run(sweep.id, None)

    def wait(self, run_id: str, timeout: float | None = None, poll: float = 0.5) -> Run:
        """Block until the run has finished (or the timeout passes); reaps and reconciles meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.reconcile()
            run = self.store.get_run(run_id)
            if run.status.finished:
                return run
            if deadline is not None and time.monotonic() > deadline:
                return run
            time.sleep(poll)

    def log_tail(self, run_id: str, lines: int = 40) -> str:
        path = RunDir(self.run_dir(run_id)).log
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])
