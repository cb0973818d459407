"""The process for one run: `python -m studio.runs.worker RUN_DIR`.

Reads RUN_DIR/config.yaml, trains, and reports into the store. Its stdout/stderr go to RUN_DIR/log.txt
(the spawner redirects them). SIGTERM asks for a checkpoint and a clean stop; an exception marks the
run failed with the reason, a suggestion, and the last log lines. On exit it starts the next queued run.

A run with more than one process: this worker starts `accelerate launch ... -m studio.runs.worker RUN_DIR`
(no shell) and waits; each launched process trains its shard (`rank_main`), the main one (rank 0) writes
metrics, saves and reports; a stop request is passed to every process, and a process that fails marks the
run failed for all.
"""

from __future__ import annotations

import signal

# A stop can come while the imports below still load (an abort right after Start): without a handler
# SIGTERM would kill the process and leave the run "interrupted" instead of aborted. Remember it instead.
_EARLY_SIGNALS: list[int] = []
if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, _frame: _EARLY_SIGNALS.append(signum))

import argparse
import contextlib
import logging
import os
import resource
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from studio.core import procs
from studio.core.allocator import choose_allocator, loaded_allocator
from studio.core.config import ConfigError, RunConfig, parse_gpu_ids
from studio.core.problems import Problem, Severity
from studio.core.procs import child_pids, process_start_token
from studio.core.store import IllegalTransition, RunStatus, Store
from studio.core.workspace import RunDir, Workspace, db_path
from studio.runs.preflight import run_problems
from studio.runs.queue import SPAWNED_ENV, JobManager
from studio.training.launch import (
    ASSIGNED_ENV,
    RankInfo,
    launch_command,
    rank_info,
    typed_line,
)

# The run's log: the worker's stdout, which the queue sends to RUN_DIR/log.txt (with transformers' own output).
LOG = logging.getLogger("studio.run")


def log_to_stdout() -> None:
    """Send the run's log to this process's stdout, one plain line per record, written at once."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


LAUNCHED_ENV = "STUDIO_LAUNCHED"  # set on `accelerate launch`: its processes are ranks of a run
JOIN_ENV = "STUDIO_JOIN"  # ranks on a machine that joined another's run: no store of the run here


class StoreSink:
    """MetricSink writing to the store and echoing a readable line to the log."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self._last_progress = 0.0

    def log(self, step: int, **values: float | None) -> None:
        self.store.log_metrics(self.run_id, step, **values)
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items() if v is not None)
        LOG.info(f"[step {step}] {shown}")

    def event(self, message: str, level: str = "info") -> None:
        self.store.add_event(self.run_id, message, level)
        LOG.info(f"[{level}] {message}")

    def progress(self, step: int, total: int) -> None:
        self.store.update_run(self.run_id, step=step, total_steps=total)


class RankSink:
    """The sink of a launched process other than the main one: the main process reports for the run, the
    others only say in the log what they would have (warnings and errors), tagged with their rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def log(self, step: int, **values: float | None) -> None:
        pass

    def event(self, message: str, level: str = "info") -> None:
        if level != "info":
            LOG.info(f"[rank {self.rank}] [{level}] {message}")

    def progress(self, step: int, total: int) -> None:
        pass


def explain(err: BaseException) -> str:
    """The error in words a user can act on: what happened and what to change."""
    from studio.data import DataError
    from studio.model.loading import ModelError
    from studio.training.errors import TrainingError, is_out_of_memory

    text = str(err) or type(err).__name__
    if isinstance(err, (DataError, ModelError, TrainingError, ConfigError)):
        return text
    if is_out_of_memory(err):
        return (
            f"Out of memory ({type(err).__name__}: {text[:200]}). Lower train.batch_size and raise "
            "train.grad_accum, shorten data.cutoff_len, turn on gradient checkpointing, or use QLoRA (4-bit)."
        )
    low = text.lower()
    if "nan" in low and "loss" in low:
        return (
            f"The loss became NaN ({text[:200]}). Lower the learning rate or lora.alpha, and keep gradient clipping on."
        )
    if any(k in text for k in ("Connection closed by peer", "Connection reset by peer", "NCCL", "gloo")):
        return (
            f"Another process of this run stopped answering ({type(err).__name__}: {text[:200]}): it was killed "
            "(out of memory?) or its machine was lost. Its own error, if it had time to write one, is in the log."
        )
    if isinstance(err, OSError) and getattr(err, "errno", None) == 28:
        return f"The disk is full ({text[:200]}). Free space or move STUDIO_HOME, then resume the run."
    return f"{type(err).__name__}: {text}"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def apply_memory_cap() -> int | None:
    """STUDIO_WORKER_MEMORY_MB caps a run's heap (RLIMIT_DATA): on a shared machine a run that outgrows it
    fails with an out-of-memory error and a suggestion, instead of pushing everything else into swap."""
    value = os.environ.get("STUDIO_WORKER_MEMORY_MB")
    if not value:
        return None
    limit = int(float(value) * 2**20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    return limit


def allocator_event(sink: StoreSink) -> None:
    """Say which allocator this worker runs under: with glibc a CPU run holds noticeably more memory."""
    loaded = loaded_allocator()
    if loaded in ("tcmalloc", "jemalloc"):
        sink.event(f"Memory allocator: {loaded}")
    else:
        wanted = choose_allocator()
        why = wanted.note or "it was not preloaded (the worker was started by hand?)"
        sink.event(f"Memory allocator: glibc malloc ({why})", level=Severity.WARNING if wanted.note else Severity.INFO)


def write_card_quietly(home: Path, run_id: str, sink: StoreSink) -> None:
    """The run card goes next to the adapter at once, so every export carries it. A card that cannot be
    written never fails a run that trained: it is said in the log and `studio card RUN` writes it later."""
    from studio.reports.card import write_card

    try:
        path = write_card(home, run_id)
        sink.event(f"Run card written to {path}")
    except Exception as err:  # noqa: BLE001 - the adapter is saved; the card is a convenience
        sink.event(f"Run card not written ({err}); `studio card {run_id}` writes it.", "warning")


def record_result(store: Store, home: Path, run_id: str, result, sink: StoreSink) -> None:
    """The run's final state from a finished training call: completed (with its card) or aborted."""
    if result.status == RunStatus.COMPLETED:
        store.transition(
            run_id,
            RunStatus.COMPLETED,
            adapter_dir=result.adapter_dir,
            final_loss=result.final_loss,
            step=result.global_step,
        )
        write_card_quietly(home, run_id, sink)
        LOG.info(f"=== completed: adapter at {result.adapter_dir}")
    else:
        reason = "Aborted by request"
        if result.checkpoint_dir:
            reason += f"; resume continues from {Path(result.checkpoint_dir).name}"
        store.transition(run_id, RunStatus.ABORTED, error=reason, step=result.global_step)
        LOG.info(f"=== aborted at step {result.global_step}")


def report_failure(store: Store | None, run_id: str, run_dir: Path, err: BaseException, who: str = "") -> None:
    """Mark the run failed with the reason, the fix and the last log lines. With several processes the
    first to fail tells the cause; the others then fail only because it left, and must not overwrite it."""
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    message = who + explain(err)
    if store is not None:
        try:
            mark_failed(store, run_id, run_dir, message)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    LOG.info(f"=== failed: {message}")


def mark_failed(store: Store, run_id: str, run_dir: Path, message: str) -> bool:
    """The run failed: the message, with the last log lines, as its error and an event. False when another
    process of the run has already reported how it ended (the first word stands)."""
    log_tail = _tail(RunDir(run_dir).log)
    error = message + (f"\n\n--- last log lines ---\n{log_tail}" if log_tail else "")
    try:
        store.transition(run_id, RunStatus.FAILED, error=error)
    except IllegalTransition:
        return False
    store.add_event(run_id, message, "error")
    return True


def _install_stop_handler(on_stop=None) -> threading.Event:
    stop = threading.Event()

    def on_signal(signum, _frame):
        first = not stop.is_set()
        if first:
            LOG.info(f"[info] {signal.Signals(signum).name} received: saving a checkpoint and stopping")
        stop.set()
        if on_stop is not None:
            on_stop(first)

    # Installed before the early signals are read: a SIGTERM landing in between is then seen, not lost.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if _EARLY_SIGNALS:  # asked to stop while still starting
        LOG.info("[info] SIGTERM received while starting: stopping before training")
        stop.set()
    return stop


def stop_check(stop: threading.Event, run_dir: Path):
    """What training asks at every step: a stop signal, or an abort request on disk (JobManager.abort)."""
    said: list[bool] = []

    def should_stop() -> bool:
        if stop.is_set():
            return True
        if RunDir(run_dir).abort_request.exists():
            if not said:
                said.append(True)
                LOG.info("[info] Abort request found: saving a checkpoint and stopping")
            stop.set()
            return True
        return False

    return should_stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.runs.worker", description="Train one run (internal).")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    log_to_stdout()
    run_dir = args.run_dir.resolve()
    home = Workspace.from_env().home
    if os.environ.get(LAUNCHED_ENV) == "1":
        return rank_main(run_dir, home, rank_info())
    store = Store(db_path(home))
    run_id = run_dir.name
    run = store.get_run(run_id)

    if os.environ.pop(SPAWNED_ENV, None) == "1":
        # Started by the queue, which marks the row running with this pid right after starting us; with the
        # store busy that write can land after we look, so wait for it rather than race it.
        deadline = time.monotonic() + 120
        while run.status == RunStatus.QUEUED and time.monotonic() < deadline:
            time.sleep(0.1)
            run = store.get_run(run_id)
    elif run.status == RunStatus.QUEUED:  # started by hand rather than by the queue
        store.transition(run_id, RunStatus.RUNNING, pid=os.getpid(), pid_started=process_start_token(os.getpid()))
        run = store.get_run(run_id)
    if run.status != RunStatus.RUNNING or run.pid != os.getpid():
        LOG.warning(
            f"Run {run_id} is {run.status.value} (pid {run.pid}); this worker (pid {os.getpid()}) will not run it."
        )
        return 2

    launcher: list[subprocess.Popen] = []  # the `accelerate launch` child, once started

    def pass_stop_on(first: bool) -> None:
        # A stop reaches the training processes themselves: each saves at the same step (they agree on it)
        # and exits, so accelerate ends cleanly. Asked twice, the launcher is told, and ends them itself.
        if not launcher:
            return
        pid = launcher[0].pid
        targets = child_pids(pid, recursive=False) if first else [pid]
        for target in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGTERM)

    stop = _install_stop_handler(pass_stop_on)
    sink = StoreSink(store, run_id)
    cap = apply_memory_cap()
    if cap:
        sink.event(f"Memory cap for this run: {cap / 2**20:.0f} MiB (STUDIO_WORKER_MEMORY_MB)")
    allocator_event(sink)
    LOG.info(f"=== run {run_id} started {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()})")
    code = 0
    try:
        config = RunConfig.load(RunDir(run_dir).config)
        if config.model.trust_remote_code:
            sink.event(
                "trust_remote_code is on: this run executes Python code shipped with the model "
                f"'{config.model.source}'. Only do this for models whose code you trust.",
                "warning",
            )
        if config.distribution.launched:
            code = launch_and_wait(config, run_dir, store, run_id, sink, stop, launcher)
        else:
            from studio.training.loop import run_training

            should_stop = stop_check(stop, run_dir)
            result = run_training(config, run_dir, sink, should_stop, resume_from=run.resume_from, home=home)
            record_result(store, home, run_id, result, sink)
    except BaseException as err:  # noqa: BLE001 - every failure must reach the store, not leave "running"
        report_failure(store, run_id, run_dir, err)
        code = 1
    finally:
        try:
            JobManager.of(Workspace.from_env(home)).schedule()  # the queue moves on without a server
        except Exception:  # noqa: BLE001 - never let the hand-off mask the run's own outcome
            traceback.print_exc()
    return code


def launch_and_wait(
    config: RunConfig,
    run_dir: Path,
    store: Store,
    run_id: str,
    sink: StoreSink,
    stop: threading.Event,
    launcher: list[subprocess.Popen],
) -> int:
    """Start every process of this machine through `accelerate launch` and wait for them. The processes
    report the run's outcome themselves; what is left here is the case where they all ended without a word
    (killed, out of memory, a machine lost)."""
    from studio.model.loading import detect_device, resolve_model
    from studio.training.loop import check_runtime

    check_runtime(config, detect_device(config.train.device))  # refused here, before N processes start
    # The bundled model is converted once on first use: done here, so the processes do not race at it.
    resolve_model(config.model.source)
    assigned = parse_gpu_ids(os.environ.get(ASSIGNED_ENV)) or config.distribution.device_ids()
    cmd = launch_command(config, run_dir, assigned or None)
    sink.event(f"Launching {config.distribution.processes} processes: {typed_line(cmd)}")
    if stop.is_set():
        store.transition(run_id, RunStatus.ABORTED, error="Aborted before the processes started.")
        return 0
    env = dict(os.environ, **{LAUNCHED_ENV: "1"})
    # In this worker's process group (an abort reaches it); killed hard, this worker takes the launcher with
    # it, and the launcher then ends its processes.
    launcher.append(procs.spawn(cmd, env, own_session=False, end_with_parent=signal.SIGTERM))
    code = launcher[0].wait()
    if store.get_run(run_id).status == RunStatus.RUNNING:
        message = (
            f"The training processes ended (accelerate launch exit code {code}) without reporting: one was "
            "killed (out of memory?) or lost its peers. See the log below."
        )
        mark_failed(store, run_id, run_dir, message)
    return 1 if store.get_run(run_id).status == RunStatus.FAILED else 0


def join(config: RunConfig, home: Path, machine_rank: int, announce: Callable[[str], None] = lambda _: None) -> int:
    """Take part from this machine in a run that machine 0 started: its share of the processes, launched
    the same way; they report to machine 0's processes, not to a store here. Blocks until they end."""

    config.distribution.machine_rank = machine_rank
    problems = run_problems(config, home, devices=False)
    said = {p.path for p in problems}
    if "distribution.num_machines" not in said and config.distribution.num_machines < 2:
        problems.append(
            Problem("distribution.num_machines", "distribution.num_machines is 1: there is no other machine to join.")
        )
    if "distribution.machine_rank" not in said and machine_rank < 1:
        problems.append(
            Problem(
                "distribution.machine_rank",
                "Machine 0 starts the run (studio train); the others join with --machine-rank 1, 2, ...",
            )
        )
    if problems:
        raise ConfigError(problems)
    run_dir = home / "joined" / f"{config.name or 'run'}-machine-{machine_rank}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    config.save(RunDir(run_dir).config)
    cmd = launch_command(config, run_dir, config.distribution.device_ids())
    announce(f"Joining as machine {machine_rank} of {config.distribution.num_machines}:\n  {typed_line(cmd)}")
    env = dict(os.environ, STUDIO_HOME=str(home), **{LAUNCHED_ENV: "1", JOIN_ENV: "1"})
    proc = procs.spawn(cmd, env, own_session=False)  # a Ctrl-C in this terminal reaches the launcher too
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()  # the launcher ends this machine's processes; machine 0's then fail and report it
        return proc.wait()


def rank_main(run_dir: Path, home: Path, rank: RankInfo) -> int:
    """One process of a launched run: train this process's shard. Rank 0 reports the outcome; any process
    that fails marks the run failed (its peers then stop at their next collective)."""
    procs.die_with_parent()  # the launcher gone, nothing is left to gather this process's gradients
    run_id = run_dir.name
    joined = os.environ.get(JOIN_ENV) == "1"
    store = None if joined else Store(db_path(home))
    if store is not None:
        run = store.get_run(run_id)
        if run.status != RunStatus.RUNNING:
            LOG.warning(f"[rank {rank.rank}] run {run_id} is {run.status.value}: not training it.")
            return 2
        resume_from = run.resume_from
    else:
        resume_from = None
    stop = _install_stop_handler()
    sink = StoreSink(store, run_id) if (store is not None and rank.main) else RankSink(rank.rank)
    LOG.info(f"=== rank {rank.rank} of {rank.world_size} started (pid {os.getpid()})")
    try:
        from studio.training.loop import run_training

        config = RunConfig.load(RunDir(run_dir).config)
        should_stop = stop.is_set if joined else stop_check(stop, run_dir)
        result = run_training(config, run_dir, sink, should_stop, resume_from=resume_from, home=home)
        if store is not None and rank.main:
            record_result(store, home, run_id, result, sink)
    except BaseException as err:  # noqa: BLE001 - the first failure reaches the store for every process
        report_failure(store, run_id, run_dir, err, who=f"Process {rank.rank} of {rank.world_size}: ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
