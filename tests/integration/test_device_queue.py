"""The queue hands out devices: runs that ask for GPUs get disjoint ones and run side by side, the rest
wait for a GPU to come free, and CPU runs keep their own slots. This machine has no GPU, so the inventory
is declared with STUDIO_GPUS (as a user does to keep some GPUs for other work); the workers are real
processes, each started with the CUDA_VISIBLE_DEVICES it was given (and, finding no CUDA, trains on CPU)."""

from __future__ import annotations

import time

import pytest

from studio.core.config import ConfigError
from studio.core.store import RunStatus
from tests.builders import small_run_config

pytestmark = pytest.mark.integration


def long_run(model_dir, name: str, **train):
    # Long enough to still be running when looked at; every test ends by aborting what is left.
    return small_run_config(model_dir, name, train={"max_steps": 100_000, "save_steps": 100_000, **train})


def worker_env(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode() for k, v in pairs}


def abort_all(jobs) -> None:
    """Abort what is queued or running, and wait for every worker to end."""
    for run in jobs.store.list_runs():
        if run.status in (RunStatus.RUNNING, RunStatus.QUEUED):
            jobs.abort(run.id)
    for run in jobs.store.list_runs():
        jobs.wait(run.id, timeout=120)


def wait_training(jobs, run_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while jobs.store.get_run(run_id).step < 1 and time.monotonic() < deadline:
        time.sleep(0.3)


def wait_status(jobs, run_id: str, status: RunStatus, timeout: float = 120):
    deadline = time.monotonic() + timeout
    run = jobs.store.get_run(run_id)
    while run.status != status and time.monotonic() < deadline:
        jobs.schedule()
        time.sleep(0.3)
        run = jobs.store.get_run(run_id)
    return run


def test_gpu_runs_get_disjoint_devices_side_by_side_and_the_rest_wait(jobs, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("STUDIO_GPUS", "0,1")
    first = jobs.submit(long_run(tiny_model_dir, "gpu-a"))
    second = jobs.submit(long_run(tiny_model_dir, "gpu-b"))
    third = jobs.submit(long_run(tiny_model_dir, "gpu-c"))
    on_cpu = jobs.submit(long_run(tiny_model_dir, "cpu", device="cpu"))
    try:
        first, second = jobs.store.get_run(first.id), jobs.store.get_run(second.id)
        assert first.status == second.status == RunStatus.RUNNING  # one CPU slot, yet both GPU runs go
        assert {first.devices, second.devices} == {"0", "1"}
        assert jobs.store.get_run(third.id).status == RunStatus.QUEUED  # both GPUs are taken
        assert jobs.store.get_run(on_cpu.id).status == RunStatus.RUNNING  # the CPU slot is its own
        assert jobs.store.get_run(on_cpu.id).devices == "cpu"
        for run in (first, second):
            assert worker_env(run.pid)["CUDA_VISIBLE_DEVICES"] == run.devices

        wait_training(jobs, first.id)
        jobs.abort(first.id)  # its GPU comes free: the waiting run gets that one
        assert wait_status(jobs, first.id, RunStatus.ABORTED).status == RunStatus.ABORTED
        third = wait_status(jobs, third.id, RunStatus.RUNNING)
        assert third.status == RunStatus.RUNNING and third.devices == first.devices
    finally:
        abort_all(jobs)


def test_pinned_gpus_wait_for_exactly_those_and_unknown_ones_are_refused(jobs, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("STUDIO_GPUS", "0,1")
    holder = jobs.submit(long_run(tiny_model_dir, "holds-1"))  # auto: gets GPU 0
    pinned_cfg = long_run(tiny_model_dir, "wants-0")
    pinned_cfg.distribution.devices = "0"
    try:
        pinned = jobs.submit(pinned_cfg)
        assert jobs.store.get_run(holder.id).devices == "0"
        assert jobs.store.get_run(pinned.id).status == RunStatus.QUEUED  # GPU 1 is free, but not its GPU

        missing = long_run(tiny_model_dir, "wants-7")
        missing.distribution.devices = "7"
        with pytest.raises(ConfigError, match="GPU 7, which the queue does not have"):
            jobs.submit(missing)
        too_many = long_run(tiny_model_dir, "wants-3")
        too_many.distribution.processes = 3
        with pytest.raises(ConfigError, match="needs 3 GPUs and the queue has 2"):
            jobs.submit(too_many)
        assert [r.name for r in jobs.store.list_runs()].count("wants-7") == 0  # nothing half-made

        wait_training(jobs, holder.id)
        jobs.abort(holder.id)
        assert wait_status(jobs, pinned.id, RunStatus.RUNNING).devices == "0"
    finally:
        abort_all(jobs)
