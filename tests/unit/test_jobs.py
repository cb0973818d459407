import os
import subprocess
import sys

import pytest

from studio.core.config import ConfigError, RunConfig
from studio.core.procs import process_alive, process_start_token
from studio.core.store import RunStatus
from studio.runs.queue import JobError, JobManager, check_workspace, make_run_id


def test_run_ids_are_unique_and_safe():
    ids = {make_run_id("My Run / ../x") for _ in range(50)}
    assert len(ids) == 50
    assert all("/" not in i and ".." not in i for i in ids)


def test_process_liveness_sees_exit_and_pid_reuse():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        token = process_start_token(proc.pid)
        assert process_alive(proc.pid, token)
        assert not process_alive(proc.pid, "12345")  # same pid, another start time: another process
    finally:
        proc.kill()
        proc.wait()
    assert not process_alive(proc.pid, token)


def test_zombie_counts_as_dead():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    import time

    time.sleep(1.0)  # exited, not reaped yet
    assert not process_alive(proc.pid)
    proc.wait()


def test_submit_refuses_unknown_dataset_and_leaves_nothing(home):
    jobs = JobManager(home)
    cfg = RunConfig()
    cfg.data.datasets = ["no-such-dataset"]
    with pytest.raises(ConfigError, match="no-such-dataset") as err:
        jobs.submit(cfg, start=False)
    assert [p.path for p in err.value.problems] == ["data.datasets"]
    assert list((home / "runs").iterdir()) == [] and jobs.store.list_runs() == []


def test_submit_skips_the_checks_of_a_field_already_refused(home):
    """An empty model.source is not resolved and bad distribution.devices are not matched against the
    queue's GPUs: each field is named once, by the check that found it."""
    jobs = JobManager(home)
    cfg = RunConfig()
    cfg.model.source = " "
    cfg.data.datasets = ["no-such-dataset"]
    cfg.distribution.devices = "0,0"
    with pytest.raises(ConfigError) as err:
        jobs.submit(cfg, start=False)
    assert [p.path for p in err.value.problems] == ["model.source", "distribution.devices", "data.datasets"]
    assert list((home / "runs").iterdir()) == []


def test_queued_run_abort_and_resume_rules(home):
    jobs = JobManager(home)
    cfg = RunConfig()
    cfg.data.datasets = ["studio-facts"]
    run = jobs.submit(cfg, start=False)
    assert run.status == RunStatus.QUEUED and (home / "runs" / run.id / "config.yaml").is_file()
    assert RunConfig.load(home / "runs" / run.id / "config.yaml") == cfg
    assert jobs.abort(run.id).status == RunStatus.ABORTED
    with pytest.raises(JobError, match="only queued or running"):
        jobs.abort(run.id)
    resumed = jobs.store.transition(run.id, RunStatus.QUEUED)
    assert resumed.status == RunStatus.QUEUED


def test_running_run_with_dead_worker_becomes_interrupted_on_startup(home):
    jobs = JobManager(home)
    cfg = RunConfig()
    cfg.data.datasets = ["studio-facts"]
    run = jobs.submit(cfg, start=False)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    jobs.store.transition(run.id, RunStatus.RUNNING, pid=proc.pid, pid_started="1")
    fresh = JobManager(home)  # what a restarted server does first
    after = fresh.store.get_run(run.id)
    assert after.status == RunStatus.INTERRUPTED and "ended without reporting" in after.error


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_unwritable_workspace_is_refused_at_start(tmp_path):
    (tmp_path / "runs").mkdir()
    os.chmod(tmp_path / "runs", 0o500)
    try:
        with pytest.raises(JobError, match="not writable"):
            check_workspace(tmp_path)
    finally:
        os.chmod(tmp_path / "runs", 0o700)


def test_delete_refuses_active_runs(home):
    jobs = JobManager(home)
    cfg = RunConfig()
    cfg.data.datasets = ["studio-facts"]
    run = jobs.submit(cfg, start=False)
    with pytest.raises(JobError, match="abort it"):
        jobs.delete(run.id)
    jobs.abort(run.id)
    jobs.delete(run.id)
    assert not (home / "runs" / run.id).exists() and jobs.store.list_runs() == []


def test_concurrent_workspace_checks_do_not_trip_each_other(tmp_path):
    """Two starts at once in one server process once removed each other's write probe."""
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "runs").mkdir()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: check_workspace(tmp_path), range(400)))
    assert list((tmp_path / "runs").iterdir()) == []


def test_queueing_a_bundled_run_does_not_wait_for_its_conversion(tmp_path, monkeypatch):
    """The bundled model's layers are known: a run is checked and queued while the model is still being
    converted; the worker waits for the conversion instead of the page."""
    from studio.core.presets import load_preset
    from studio.model.loading import BUNDLED_DIRNAME
    from studio.runs.preflight import model_problems

    cache = tmp_path / "cache"
    monkeypatch.setenv("STUDIO_MODEL_CACHE", str(cache))
    cfg = load_preset("quick-demo")
    assert model_problems(cfg) == []
    cfg.lora.target_modules = ["q_proj", "qkv_proj"]
    (problem,) = model_problems(cfg)
    assert problem.path == "lora.target_modules"
    assert "qkv_proj not found" in str(problem) and "down_proj" in str(problem)
    assert not (cache / BUNDLED_DIRNAME).exists()
