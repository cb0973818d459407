"""Real worker processes on a tiny random Llama: SIGTERM saves and aborts, SIGKILL is found and resumed,
an exception fails the run with its reason. Behaviour, not learning, is under test here."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from studio.core.config import RunConfig
from studio.core.procs import process_alive
from studio.core.store import RunStatus
from studio.core.workspace import RunDir, Workspace, checkpoint_step
from studio.runs.queue import JobManager
from tests.builders import small_run_config

pytestmark = pytest.mark.integration


def tiny_config(model_dir, max_steps: int, **train) -> RunConfig:
    return small_run_config(model_dir, train={"max_steps": max_steps, "save_steps": 10, "save_total_limit": 2, **train})


def wait_for(predicate, timeout: float = 120.0, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("condition not met in time")


def test_sigterm_saves_a_checkpoint_and_aborts(jobs, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = jobs.submit(tiny_config(tiny_model_dir, max_steps=5000))
    wait_for(lambda: jobs.store.get_run(run.id).step >= 3)
    os.kill(jobs.store.get_run(run.id).pid, signal.SIGTERM)
    done = jobs.wait(run.id, timeout=120)
    assert done.status == RunStatus.ABORTED, done.error
    ckpt = RunDir(jobs.run_dir(run.id)).latest_checkpoint()
    assert ckpt is not None and checkpoint_step(ckpt) >= 3
    assert checkpoint_step(ckpt) == done.step  # saved exactly where it stopped, not at the last save_steps
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ckpt)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    assert not (jobs.run_dir(run.id) / "adapter").exists()  # only a completed run has a final adapter


def test_an_abort_request_on_disk_stops_the_run_without_a_signal(jobs, tiny_model_dir):
    """JobManager.abort writes the request before it signals: a worker that missed the SIGTERM still stops,
    and resume clears the request so the resumed run trains on."""
    run = jobs.submit(tiny_config(tiny_model_dir, max_steps=5000))
    wait_for(lambda: jobs.store.get_run(run.id).step >= 3)
    RunDir(jobs.run_dir(run.id)).abort_request.write_text("test\n")  # no signal sent
    done = jobs.wait(run.id, timeout=120)
    assert done.status == RunStatus.ABORTED, done.error
    resumed = jobs.resume(run.id)
    assert not RunDir(jobs.run_dir(run.id)).abort_request.exists()
    wait_for(lambda: jobs.store.get_run(run.id).step > done.step + 2)
    jobs.abort(resumed.id)
    assert jobs.wait(run.id, timeout=120).status == RunStatus.ABORTED


def test_sigkill_is_marked_interrupted_and_resume_continues_the_curve(jobs, home, tiny_model_dir):
    run = jobs.submit(tiny_config(tiny_model_dir, max_steps=60))
    wait_for(
        lambda: RunDir(jobs.run_dir(run.id)).latest_checkpoint() is not None and jobs.store.get_run(run.id).step >= 12
    )
    pid = jobs.store.get_run(run.id).pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(pid))
    jobs._children.clear()  # forget the child, as a restarted server would
    restarted = JobManager(home)
    killed = restarted.store.get_run(run.id)
    assert killed.status == RunStatus.INTERRUPTED and f"pid {pid}" in killed.error
    ckpt = restarted.resumable_checkpoint(run.id)
    assert ckpt is not None
    resumed_from = checkpoint_step(ckpt)

    restarted.resume(run.id)
    done = restarted.wait(run.id, timeout=300)
    assert done.status == RunStatus.COMPLETED, done.error
    steps = [m.step for m in restarted.store.metrics(run.id) if m.loss is not None]
    assert steps == sorted(set(steps))  # no step twice: the curve continues, it does not restart
    assert steps[0] == 1 and steps[-1] == 60 and resumed_from in steps
    assert done.step == 60
    assert any(f"Resuming from checkpoint-{resumed_from}" in e.message for e in restarted.store.events(run.id))


def test_an_exception_fails_the_run_with_reason_and_log(jobs, tiny_model_dir):
    # submit refuses a missing layer; a config.yaml edited by hand afterwards still fails clearly in the worker
    cfg = tiny_config(tiny_model_dir, max_steps=5)
    run = jobs.submit(cfg, start=False)
    cfg.lora.target_modules = ["q_proj", "no_such_layer"]
    cfg.save(Path(run.run_dir) / "config.yaml")
    jobs.schedule()
    done = jobs.wait(run.id, timeout=120)
    assert done.status == RunStatus.FAILED
    assert "no_such_layer" in done.error and "q_proj" in done.error  # what is wrong and what exists
    assert "--- last log lines ---" in done.error
    assert done.pid is None and done.finished_at is not None


def test_queue_runs_one_at_a_time_and_moves_on_by_itself(jobs, tiny_model_dir):
    first = jobs.submit(tiny_config(tiny_model_dir, max_steps=8))
    second = jobs.submit(tiny_config(tiny_model_dir, max_steps=8))
    assert jobs.store.get_run(second.id).status == RunStatus.QUEUED  # one training slot
    # No scheduler runs in this test: the first worker starts the second when it finishes.
    done = jobs.wait(second.id, timeout=180)
    assert done.status == RunStatus.COMPLETED
    a, b = jobs.store.get_run(first.id), done
    assert a.status == RunStatus.COMPLETED and a.finished_at <= b.started_at
    assert [m.step for m in jobs.store.metrics(a.id)] == [m.step for m in jobs.store.metrics(b.id)]


def test_out_of_memory_fails_with_the_reason_and_what_to_change(jobs, tiny_model_dir, monkeypatch):
    # A real allocator failure: the run's heap is capped (STUDIO_WORKER_MEMORY_MB) well above what loading
    # needs and far below what a 100-sample batch of 49k-vocabulary logits needs.
    monkeypatch.setenv("STUDIO_WORKER_MEMORY_MB", "4000")
    cfg = tiny_config(tiny_model_dir, max_steps=3, batch_size=128)
    cfg.data.datasets = ["studio-facts", "studio-chats"]
    cfg.data.cutoff_len = 256
    run = jobs.submit(cfg)
    done = jobs.wait(run.id, timeout=300)
    assert done.status == RunStatus.FAILED
    assert done.error.startswith("Out of memory")
    assert "train.batch_size" in done.error and "gradient checkpointing" in done.error


def test_unwritable_workspace_and_full_disk_are_refused_at_start(jobs, home, tiny_model_dir, monkeypatch):
    from studio.runs.queue import JobError

    jobs.min_free_mb = 10**12  # more room than any disk has (STUDIO_MIN_FREE_MB)
    with pytest.raises(JobError, match="MiB free on the disk"):
        jobs.submit(tiny_config(tiny_model_dir, max_steps=3))
    jobs.min_free_mb = Workspace.min_free_mb
    runs = home / "runs"
    runs.rmdir()
    runs.write_text("not a folder")  # writes under runs/ now fail, also for root
    with pytest.raises(JobError, match="not writable"):
        jobs.submit(tiny_config(tiny_model_dir, max_steps=3))
    assert jobs.store.list_runs() == []


def test_a_store_locked_by_another_process_loses_no_metrics(jobs, home, tiny_model_dir):
    import subprocess
    import sys

    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
            "end = time.time() + 25\n"
            "while time.time() < end:\n"
            "    c.execute('BEGIN EXCLUSIVE'); time.sleep(1.5); c.execute('COMMIT'); time.sleep(0.3)\n",
            str(home / "studio.db"),
        ]
    )
    try:
        run = jobs.submit(tiny_config(tiny_model_dir, max_steps=40, save_steps=1000))
        done = jobs.wait(run.id, timeout=300)
    finally:
        locker.kill()
        locker.wait()
    assert done.status == RunStatus.COMPLETED, done.error
    assert [m.step for m in jobs.store.metrics(run.id) if m.loss is not None] == list(range(1, 41))


def test_a_corrupt_checkpoint_is_named_and_the_previous_one_used(jobs, tiny_model_dir):
    from studio.runs.queue import JobError

    run = jobs.submit(tiny_config(tiny_model_dir, max_steps=5000, save_steps=5, save_total_limit=3))
    wait_for(lambda: len(jobs.checkpoints(run.id)) >= 2)
    jobs.abort(run.id)
    assert jobs.wait(run.id, timeout=120).status == RunStatus.ABORTED
    newest, previous = [path for path, _ in jobs.checkpoints(run.id)][:2]
    (newest / "optimizer.pt").write_bytes(b"\x00" * 100)  # a half-written file

    with pytest.raises(JobError) as err:
        jobs.resume(run.id, newest.name)
    assert f"{newest.name} cannot be resumed from: optimizer.pt is truncated or corrupt" in str(err.value)
    assert previous.name in str(err.value)  # the usable one is offered

    resumed = jobs.resume(run.id)
    assert resumed.resume_from == str(previous)
    messages = [e.message for e in jobs.store.events(run.id)]
    assert any(newest.name in m and "skipped" in m for m in messages)
    wait_for(lambda: jobs.store.get_run(run.id).step > checkpoint_step(previous))
    jobs.abort(run.id)
    assert jobs.wait(run.id, timeout=120).status == RunStatus.ABORTED


def test_trusting_remote_code_is_warned_about(jobs, tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, max_steps=2)
    cfg.model.trust_remote_code = True
    run = jobs.submit(cfg)
    assert jobs.wait(run.id, timeout=120).status == RunStatus.COMPLETED
    warnings = [e.message for e in jobs.store.events(run.id) if e.level == "warning"]
    assert any("trust_remote_code is on" in m for m in warnings)
