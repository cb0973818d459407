"""Two processes on CPU through the real launcher (`accelerate launch`, DDP over gloo): both take part,
each on its own shard; the loss falls; the saved adapter is what every process held; an abort stops both
at the same step with a checkpoint and leaves no process behind."""

from __future__ import annotations

import os
import signal
import time

import pytest
from safetensors.torch import load_file

from studio.core.procs import child_pids, process_alive
from studio.core.store import RunStatus
from studio.training.launch import lora_digest, read_rank_reports
from tests.builders import small_run_config

pytestmark = pytest.mark.integration

SAMPLES = 32  # divisible by processes x batch: no sample repeated to even out the shards
BATCH = 2
PROCESSES = 2


def two_process_config(name: str, **train):
    return small_run_config(
        "bundled",
        name,
        data={"max_samples": SAMPLES, "cutoff_len": 64},
        train={
            "max_steps": 0,
            "epochs": 1.0,
            "batch_size": BATCH,
            "learning_rate": 2e-3,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "save_steps": 100,
            "num_threads": 1,
            **train,
        },
        distribution={"processes": PROCESSES},
    )


def test_two_cpu_processes_train_their_shards_into_one_adapter(jobs, tokenizer):
    from studio.training.stages.sft import prepare_data

    cfg = two_process_config("ddp")
    run = jobs.wait(jobs.submit(cfg).id, timeout=600)
    assert run.status == RunStatus.COMPLETED, run.error

    # What a 1-process run would see: 32 samples, one epoch; 2 processes x batch 2 -> 8 steps.
    data = prepare_data(cfg, tokenizer, jobs.home)
    assert len(data.train) == SAMPLES
    assert run.step == SAMPLES // (PROCESSES * BATCH)

    reports = read_rank_reports(run.run_dir)
    assert [r.rank for r in reports] == [0, 1] and all(r.world_size == 2 for r in reports)
    assert len({r.pid for r in reports}) == 2  # two processes, not one reporting twice
    assert all(r.global_step == run.step for r in reports)
    assert [r.samples for r in reports] == [SAMPLES // PROCESSES] * PROCESSES  # each fed its half
    # Disjoint halves that cover the data: their tokens add up to the whole training set's.
    assert sum(r.real_tokens for r in reports) == sum(len(row["input_ids"]) for row in data.train)
    assert all(r.real_tokens > 0 for r in reports)

    losses = [m.loss for m in jobs.store.metrics(run.id) if m.loss is not None]
    assert len(losses) >= 4 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses

    saved = lora_digest(load_file(f"{run.adapter_dir}/adapter_model.safetensors"))
    assert {r.lora_sha256 for r in reports} == {saved}  # main held it, the other held the same, it was saved

    events = " ".join(e.message for e in jobs.store.events(run.id))
    assert "accelerate launch --num_processes 2" in events and "2 processes" in events


def test_aborting_a_two_process_run_checkpoints_and_leaves_no_process(jobs):
    cfg = two_process_config("ddp-abort", max_steps=400, save_steps=1000)
    run = jobs.submit(cfg)
    deadline = time.monotonic() + 300
    ranks: list[int] = []
    while time.monotonic() < deadline:  # both processes running and the first step logged
        run = jobs.store.get_run(run.id)
        tree = child_pids(run.pid) if run.pid else []
        ranks = [p for p in tree if _is_rank(p)]
        if run.status != RunStatus.RUNNING or (len(ranks) == 2 and jobs.store.metrics(run.id)):
            break
        time.sleep(0.5)
    assert run.status == RunStatus.RUNNING and len(ranks) == 2, (run.status, run.error)
    everyone = [run.pid, *child_pids(run.pid)]

    jobs.abort(run.id)
    run = jobs.wait(run.id, timeout=240)
    assert run.status == RunStatus.ABORTED, run.error
    assert "resume continues from checkpoint-" in (run.error or "")
    reports = read_rank_reports(run.run_dir)
    assert len(reports) == 2 and reports[0].global_step == reports[1].global_step  # stopped at one step
    assert jobs.resumable_checkpoint(run.id) is not None

    deadline = time.monotonic() + 60
    while any(process_alive(p) for p in everyone) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [p for p in everyone if process_alive(p)] == []


def _is_rank(pid: int) -> bool:
    """A training process of a launched run: torchrun gave it a LOCAL_RANK, the worker its flag."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return b"STUDIO_LAUNCHED=1" in env and any(e.startswith(b"LOCAL_RANK=") for e in env)


def test_a_second_machine_joins_with_studio_join(jobs, tmp_path):
    """Two machines, simulated by two workspaces on this one: machine 0 trains through its queue,
    machine 1 runs `studio join` with the same config; they meet at machine 0's address and port."""
    import subprocess
    import sys

    from bench.common import free_port

    cfg = two_process_config("two-machines")
    cfg.distribution.num_machines = 2
    cfg.distribution.main_address = "127.0.0.1"
    cfg.distribution.main_port = free_port()
    config_file = tmp_path / "run.yaml"
    cfg.save(config_file)
    other_home = tmp_path / "machine-1"
    joiner = subprocess.Popen(
        [sys.executable, "-m", "studio.cli", "join", str(config_file), "--machine-rank", "1"],
        env=dict(os.environ, STUDIO_HOME=str(other_home)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        run = jobs.wait(jobs.submit(cfg).id, timeout=600)
        out, _ = joiner.communicate(timeout=120)
    finally:
        if joiner.poll() is None:
            joiner.kill()
    assert run.status == RunStatus.COMPLETED, run.error
    assert joiner.returncode == 0, out[-3000:]
    assert "Joining as machine 1 of 2" in out and "--machine_rank 1" in out

    here = read_rank_reports(run.run_dir)
    (joined_dir,) = (other_home / "joined").iterdir()
    there = read_rank_reports(joined_dir)
    assert [r.rank for r in here] == [0] and [r.rank for r in there] == [1]  # one process on each machine
    assert here[0].samples == there[0].samples == SAMPLES // 2 and run.step == SAMPLES // (2 * BATCH)
    saved = lora_digest(load_file(f"{run.adapter_dir}/adapter_model.safetensors"))
    assert here[0].lora_sha256 == there[0].lora_sha256 == saved


def test_a_process_killed_mid_run_fails_the_run_for_all_and_leaves_no_process(jobs):
    cfg = two_process_config("ddp-killed", max_steps=400, save_steps=1000)
    run = jobs.submit(cfg)
    deadline = time.monotonic() + 300
    ranks: list[int] = []
    while time.monotonic() < deadline:
        run = jobs.store.get_run(run.id)
        ranks = [p for p in child_pids(run.pid) if _is_rank(p)] if run.pid else []
        if run.status != RunStatus.RUNNING or (len(ranks) == 2 and jobs.store.metrics(run.id)):
            break
        time.sleep(0.5)
    assert run.status == RunStatus.RUNNING and len(ranks) == 2, (run.status, run.error)
    everyone = [run.pid, *child_pids(run.pid)]
    os.kill(max(ranks), signal.SIGKILL)  # a process dies as the OOM killer would take it: no word left
    run = jobs.wait(run.id, timeout=240)
    assert run.status == RunStatus.FAILED
    assert "Another process of this run stopped answering" in run.error or "without reporting" in run.error

    deadline = time.monotonic() + 90
    while any(process_alive(p) for p in everyone) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [p for p in everyone if process_alive(p)] == []
