"""studio doctor: each broken state built by hand in a real workspace; check() finds exactly it, repair() fixes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio.cli.doctor import run_doctor
from studio.core.config import RunConfig
from studio.core.store import RunStatus, Store
from studio.core.workspace import RunDir, db_path
from studio.data import DatasetRegistry
from studio.runs.queue import JobManager
from studio.services import checkup as doctor

ALPACA = '{"instruction": "Say hi", "output": "hi"}\n{"instruction": "Say yo", "output": "yo"}\n'


@pytest.fixture
def store(home) -> Store:
    s = Store(db_path(home))
    yield s
    s.close()


def make_run(home: Path, store: Store, run_id: str, status: RunStatus, with_dir: bool = True) -> Path:
    cfg = RunConfig(name=run_id)
    cfg.data.datasets = ["studio-facts"]
    run_dir = home / "runs" / run_id
    if with_dir:
        run_dir.mkdir()
        cfg.save(RunDir(run_dir).config)
    store.create_run(run_id, run_id, cfg.to_dict(), str(run_dir))
    if status == RunStatus.QUEUED:
        return run_dir
    store.transition(run_id, RunStatus.RUNNING, pid=os.getpid())
    if status != RunStatus.RUNNING:
        store.transition(run_id, status, adapter_dir=str(run_dir / "adapter"))
    return run_dir


def save_tiny_adapter(model_dir: Path, out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(out)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def kinds(home: Path) -> list[tuple[str, str]]:
    return [(f.kind, f.subject) for f in doctor.check(home)]


def test_healthy_workspace_has_no_findings(home, store, tiny_model_dir, tmp_path, capsys):
    run_dir = make_run(home, store, "done", RunStatus.COMPLETED)
    save_tiny_adapter(tiny_model_dir, run_dir / "adapter")
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    src = tmp_path / "qa.jsonl"
    src.write_text(ALPACA)
    DatasetRegistry(home).add("qa", src)
    (home / "datasets" / ".adding-fresh").mkdir()  # a registration in progress right now: not a leftover

    assert doctor.check(home) == []
    assert run_doctor(home) == 0
    assert capsys.readouterr().out == "Workspace is healthy: no problems found.\n"


def test_orphan_run_dir_is_moved_to_trash(home, store):
    orphan = home / "runs" / "20240101-000000-lost-abcd"
    orphan.mkdir()
    (orphan / "log.txt").write_text("half a run")
    assert kinds(home) == [("orphan-run-dir", orphan.name)]
    (done,) = doctor.repair(home, doctor.check(home))
    assert not orphan.exists()
    (moved,) = (home / "trash").glob(f"*/runs/{orphan.name}")
    assert (moved / "log.txt").read_text() == "half a run" and done.endswith(str(moved))
    assert doctor.check(home) == []


@pytest.mark.parametrize("status", [RunStatus.FAILED, RunStatus.QUEUED, RunStatus.COMPLETED])
def test_run_without_dir_loses_its_row_which_is_kept_in_trash(home, store, status):
    make_run(home, store, "gone", status, with_dir=False)
    assert kinds(home) == [("missing-run-dir", "gone")]
    doctor.repair(home, doctor.check(home))
    assert store.list_runs() == []
    (saved,) = (home / "trash").glob("*/run-gone.json")
    assert json.loads(saved.read_text())["status"] == status.value
    (config,) = (home / "trash").glob("*/run-gone.yaml")
    assert RunConfig.load(config).name == "gone"  # `studio train` can repeat it
    assert doctor.check(home) == []


def test_running_run_without_dir_but_a_live_worker_is_left_alone(home, store):
    make_run(home, store, "live", RunStatus.RUNNING, with_dir=False)  # pid = this test process
    (finding,) = doctor.check(home)
    assert (finding.kind, finding.repairable) == ("missing-run-dir", False)
    assert finding.fix == "abort it (studio abort live), then run `studio doctor --repair`"
    assert doctor.repair(home, [finding]) == [] and store.get_run("live").status == RunStatus.RUNNING


def test_running_run_whose_worker_is_gone_becomes_interrupted(home, store):
    make_run(home, store, "stuck", RunStatus.RUNNING)
    store.update_run("stuck", pid=dead_pid(), pid_started="1")
    assert kinds(home) == [("stuck-running", "stuck")]
    assert doctor.repair(home, doctor.check(home)) == ["marked stuck interrupted"]
    assert store.get_run("stuck").status == RunStatus.INTERRUPTED
    assert doctor.check(home) == []


def test_completed_run_without_adapter_is_failed_and_resumable(home, store, monkeypatch):
    run_dir = make_run(home, store, "noadapter", RunStatus.COMPLETED)
    (run_dir / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    assert kinds(home) == [("missing-adapter", "noadapter")]
    doctor.repair(home, doctor.check(home))
    run = store.get_run("noadapter")
    assert run.status == RunStatus.FAILED and "adapter files of this completed run are missing" in run.error
    assert (run_dir / "checkpoints" / "checkpoint-5").is_dir()  # kept
    assert doctor.check(home) == []
    assert JobManager(home, slots=0).resume("noadapter").status == RunStatus.QUEUED


def test_queued_run_without_config_gets_it_back_from_the_store(home, store):
    run_dir = make_run(home, store, "noconfig", RunStatus.QUEUED)
    (RunDir(run_dir).config).unlink()
    assert kinds(home) == [("queued-no-config", "noconfig")]
    doctor.repair(home, doctor.check(home))
    assert RunConfig.load(RunDir(run_dir).config) == RunConfig.from_dict(store.get_run("noconfig").config)
    assert doctor.check(home) == []


def test_changed_dataset_file_is_reported_not_repaired(home, store, tmp_path):
    src = tmp_path / "qa.jsonl"
    src.write_text(ALPACA)
    DatasetRegistry(home).add("qa", src)
    stored = home / "datasets" / "qa" / "data.jsonl"
    stored.write_text(ALPACA.replace("hi", "bye"))
    (finding,) = doctor.check(home)
    assert (finding.kind, finding.subject, finding.repairable) == ("dataset-hash-mismatch", "qa", False)
    assert finding.fix == "remove it (studio datasets remove qa) and register the original file again"
    assert doctor.repair(home, [finding]) == []
    assert stored.read_text() == ALPACA.replace("hi", "bye")
    assert run_doctor(home, do_repair=True) == 1


def test_dataset_dir_without_entry_is_moved_to_trash(home, store):
    leftover = home / "datasets" / "crashed"
    leftover.mkdir()
    (leftover / "data.jsonl").write_text(ALPACA)
    assert kinds(home) == [("dataset-no-entry", "crashed")]
    doctor.repair(home, doctor.check(home))
    (moved,) = (home / "trash").glob("*/datasets/crashed")
    assert (moved / "data.jsonl").read_text() == ALPACA and not leftover.exists()
    assert doctor.check(home) == []


@pytest.mark.parametrize("where", ["datasets/.adding-x1", "runs/.tmp-y2", ".export-z3", "models/.convert-w4"])
def test_old_temp_leftovers_are_moved_to_trash(home, store, where):
    old = home / where
    old.mkdir()
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    assert kinds(home) == [("temp-leftover", str(old))]
    doctor.repair(home, doctor.check(home))
    assert not old.exists() and len(list((home / "trash").glob(f"*/{where}"))) == 1
    assert doctor.check(home) == []
