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
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from studio.allocator import child_env
from studio.config import ConfigError, RunConfig
from studio.paths import db_path, ensure_home, runs_dir, studio_home
from studio.store import Run, RunStatus, Store
from studio.train import checkpoint_step, list_checkpoints

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.txt"
CHECKPOINT_FILES = ("adapter_model.safetensors", "trainer_state.json", "optimizer.pt")


def min_free_bytes() -> int:
    """Room a run needs for its checkpoints; STUDIO_MIN_FREE_MB overrides (default 200 MiB: a small adapter
    plus optimizer state, with room to spare)."""
    return int(float(os.environ.get("STUDIO_MIN_FREE_MB", "200")) * 2**20)


SPAWNED_ENV = "STUDIO_WORKER_SPAWNED"  # set by the queue: the worker waits for its row, never claims it


class JobError(RuntimeError):
    """A queue action that cannot be done; the message says why."""


def process_start_token(pid: int) -> str | None:
    """The kernel's start time of a process: a pid reused by another program gives another token."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int | None, token: str | None = None) -> bool:
    if not pid:
        return False
    if os.path.exists("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            return False
        state = stat[stat.rfind(")") + 2 :].split()[0]
        if state in ("Z", "X"):  # exited, not yet reaped by its parent
            return False
        return token is None or process_start_token(pid) == token
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (missing or unreadable parts), or None if it is whole."""
    path = Path(path)
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is not valid JSON"
    try:
        from safetensors import safe_open

        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            list(f.keys())
    except Exception:  # noqa: BLE001 - safetensors raises several types for a damaged file
        return "adapter_model.safetensors is unreadable"
    if not zipfile.is_zipfile(path / "optimizer.pt"):  # torch.save writes a zip archive
        return "optimizer.pt is truncated or corrupt"
    return None


def model_problems(config: RunConfig, known: list[str] | tuple[str, ...] = ()) -> list[str]:
    """What is wrong with the model and its LoRA targets, found from the model's config alone (no weights),
    so a bad path, an unreachable hub id or a missing layer is refused before a run exists."""
    from studio.models import (
        ModelError,
        build_skeleton,
        expand_targets,
        linear_layer_names,
        load_config,
        resolve_model,
    )

    if any(p.startswith("model.source") for p in known):
        return []  # already reported; nothing to resolve
    try:
        resolved = resolve_model(config.model.source)
        model_config = load_config(resolved, config.model.trust_remote_code)
    except ModelError as err:
        return [" ".join(str(err).split())]  # transformers' reasons span lines; a problem is one line
    if any(p.startswith("lora.target_modules") for p in known):
        return []
    try:
        available = linear_layer_names(build_skeleton(model_config))
    except (ValueError, KeyError) as err:  # transformers: no causal-LM class for this config
        return [f"'{config.model.source}' is not a causal language model this version can train ({err})."]
    targets = expand_targets(config.lora.target_modules, available)
    missing = [t for t in targets if t not in available]
    if missing or not targets:
        return [
            f"lora.target_modules: {', '.join(missing) or '(none)'} not found in this model. "
            f"Its linear layers are: {', '.join(available)}; or use 'all-linear'."
        ]
    return []


def make_run_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:32] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{secrets.token_hex(2)}"


def check_workspace(home: Path) -> None:
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
    free, need = shutil.disk_usage(home).free, min_free_bytes()
    if free < need:
        raise JobError(
            f"Only {free / 2**20:.0f} MiB free on the disk of {home}; a run needs at least "
            f"{need / 2**20:.0f} MiB for checkpoints. Free some space or move STUDIO_HOME."
        )


@dataclass
class JobManager:
    home: Path = field(default_factory=studio_home)
    slots: int = field(default_factory=lambda: int(os.environ.get("STUDIO_SLOTS", "1")))
    _store: Store | None = field(default=None, init=False, repr=False)
    _children: dict[int, subprocess.Popen] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.home = ensure_home(Path(self.home))
        self.reconcile()

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
    def submit(self, config: RunConfig, start: bool = True) -> Run:
        """Validate, create the run directory and its row (queued), and start it if a slot is free."""
        problems = config.validate()
        problems += self._missing_datasets(config)
        problems += model_problems(config, problems)
        if problems:
            raise ConfigError(problems)
        check_workspace(self.home)
        run_id = make_run_id(config.name or "run")
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True)
        try:
            config.save(run_dir / CONFIG_FILE)
            run = self.store.create_run(run_id, config.name or run_id, config.to_dict(), str(run_dir))
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if start:
            self.schedule()
        return self.store.get_run(run.id)

    def _missing_datasets(self, config: RunConfig) -> list[str]:
        from studio.data import DataError, DatasetRegistry

        registry = DatasetRegistry(self.home)
        missing = []
        for name in config.data.datasets:
            try:
                registry.get(name)
            except (DataError, KeyError):
                missing.append(f"Dataset '{name}' is not registered. Register it first (studio datasets add).")
        return missing

    # -- scheduling ---------------------------------------------------------------------------
    def schedule(self) -> list[str]:
        """Start queued runs, oldest first, while training slots are free. Returns the ids started."""
        started: list[str] = []
        with self._lock():
            self._reconcile_locked()
            busy = len(self.store.list_runs(RunStatus.RUNNING))
            for run in self.store.queued_runs():
                if busy >= self.slots:
                    break
                self._spawn(run)
                started.append(run.id)
                busy += 1
        return started

    def _spawn(self, run: Run) -> None:
        run_dir = Path(run.run_dir)
        cmd = [sys.executable, "-m", "studio.worker", str(run_dir)]
        env = child_env(dict(os.environ, STUDIO_HOME=str(self.home), PYTHONUNBUFFERED="1"))
        env[SPAWNED_ENV] = "1"
        with open(run_dir / LOG_FILE, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own session: closing the UI does not stop it
            )
        self._children[proc.pid] = proc
        self.store.transition(run.id, RunStatus.RUNNING, pid=proc.pid, pid_started=process_start_token(proc.pid))
        self.store.add_event(run.id, f"Worker started (pid {proc.pid})")

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
            os.kill(run.pid, signal.SIGTERM)
            self.store.add_event(run_id, "Abort requested: saving a checkpoint, then stopping")
        else:
            self.reconcile()
        return self.store.get_run(run_id)

    def checkpoints(self, run_id: str) -> list[tuple[Path, str | None]]:
        """Every checkpoint of a run, newest first, with why it cannot be used (None if it can)."""
        return [(path, checkpoint_problem(path)) for path in list_checkpoints(self.run_dir(run_id))]

    def resumable_checkpoint(self, run_id: str) -> Path | None:
        return next((path for path, problem in self.checkpoints(run_id) if problem is None), None)

    def resume(self, run_id: str, checkpoint: str | None = None) -> Run:
        """Queue a stopped run again, continuing from its newest complete checkpoint (or the one named)."""
        run = self.store.get_run(run_id)
        if run.status not in (RunStatus.INTERRUPTED, RunStatus.ABORTED, RunStatus.FAILED):
            raise JobError(f"Run {run_id} is {run.status.value}; only interrupted, aborted or failed runs resume.")
        found = self.checkpoints(run_id)
        usable = [p.name for p, problem in found if problem is None]
        if checkpoint:
            path = self.run_dir(run_id) / "checkpoints" / Path(checkpoint).name
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
        path = self.run_dir(run_id) / LOG_FILE
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])
