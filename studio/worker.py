"""The process for one run: `python -m studio.worker RUN_DIR`.

Reads RUN_DIR/config.yaml, trains, and reports into the store. Its stdout/stderr go to RUN_DIR/log.txt
(the spawner redirects them). SIGTERM asks for a checkpoint and a clean stop; an exception marks the
run failed with the reason, a suggestion, and the last log lines. On exit it starts the next queued run.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from studio.allocator import choose_allocator, loaded_allocator
from studio.config import ConfigError, RunConfig
from studio.jobs import CONFIG_FILE, SPAWNED_ENV, JobManager, process_start_token
from studio.paths import db_path, studio_home
from studio.store import RunStatus, Store


class StoreSink:
    """MetricSink writing to the store and echoing a readable line to the log."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self._last_progress = 0.0

    def log(self, step: int, **values: float | None) -> None:
        self.store.log_metrics(self.run_id, step, **values)
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items() if v is not None)
        print(f"[step {step}] {shown}", flush=True)

    def event(self, message: str, level: str = "info") -> None:
        self.store.add_event(self.run_id, message, level)
        print(f"[{level}] {message}", flush=True)

    def progress(self, step: int, total: int) -> None:
        self.store.update_run(self.run_id, step=step, total_steps=total)


def explain(err: BaseException) -> str:
    """The error in words a user can act on: what happened and what to change."""
    from studio.data import DataError
    from studio.models import ModelError
    from studio.train import TrainingError

    text = str(err) or type(err).__name__
    if isinstance(err, (DataError, ModelError, TrainingError, ConfigError)):
        return text
    low = text.lower()
    if isinstance(err, MemoryError) or "out of memory" in low or "cuda oom" in low or "can't allocate" in low:
        return (
            f"Out of memory ({type(err).__name__}: {text[:200]}). Lower train.batch_size and raise "
            "train.grad_accum, shorten data.cutoff_len, turn on gradient checkpointing, or use QLoRA (4-bit)."
        )
    if "nan" in low and "loss" in low:
        return (
            f"The loss became NaN ({text[:200]}). Lower the learning rate or lora.alpha, and keep gradient clipping on."
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
        sink.event(f"Memory allocator: glibc malloc ({why})", level="warning" if wanted.note else "info")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.worker", description="Train one run (internal).")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    home = studio_home()
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
        print(
            f"Run {run_id} is {run.status.value} (pid {run.pid}); this worker (pid {os.getpid()}) will not run it.",
            file=sys.stderr,
        )
        return 2

    stop = threading.Event()

    def on_signal(signum, _frame):
        if not stop.is_set():
            print(f"[info] {signal.Signals(signum).name} received: saving a checkpoint and stopping", flush=True)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    sink = StoreSink(store, run_id)
    cap = apply_memory_cap()
    if cap:
        sink.event(f"Memory cap for this run: {cap / 2**20:.0f} MiB (STUDIO_WORKER_MEMORY_MB)")
    allocator_event(sink)
    print(f"=== run {run_id} started {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()})", flush=True)
    code = 0
    try:
        from studio.train import run_training

        config = RunConfig.load(run_dir / CONFIG_FILE)
        if config.model.trust_remote_code:
            sink.event(
                "trust_remote_code is on: this run executes Python code shipped with the model "
                f"'{config.model.source}'. Only do this for models whose code you trust.",
                "warning",
            )
        result = run_training(config, run_dir, sink, stop.is_set, resume_from=run.resume_from, home=home)
        if result.status == "completed":
            store.transition(
                run_id,
                RunStatus.COMPLETED,
                adapter_dir=result.adapter_dir,
                final_loss=result.final_loss,
                step=result.global_step,
            )
            print(f"=== completed: adapter at {result.adapter_dir}", flush=True)
        else:
            reason = "Aborted by request"
            if result.checkpoint_dir:
                reason += f"; resume continues from {Path(result.checkpoint_dir).name}"
            store.transition(run_id, RunStatus.ABORTED, error=reason, step=result.global_step)
            print(f"=== aborted at step {result.global_step}", flush=True)
    except BaseException as err:  # noqa: BLE001 - every failure must reach the store, not leave "running"
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        message = explain(err)
        log_tail = _tail(run_dir / "log.txt")
        error = message + (f"\n\n--- last log lines ---\n{log_tail}" if log_tail else "")
        try:
            store.transition(run_id, RunStatus.FAILED, error=error)
            store.add_event(run_id, message, "error")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        print(f"=== failed: {message}", flush=True)
        code = 1
    finally:
        try:
            JobManager(home).schedule()  # the queue moves on without a server
        except Exception:  # noqa: BLE001 - never let the hand-off mask the run's own outcome
            traceback.print_exc()
    return code


if __name__ == "__main__":
    sys.exit(main())
