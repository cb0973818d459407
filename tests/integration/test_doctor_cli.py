"""`studio doctor` end to end: a workspace broken in several ways at once, checked, repaired, checked again."""

from __future__ import annotations

import json

from studio.cli.main import main
from studio.core.config import RunConfig
from studio.core.store import Store
from studio.core.workspace import db_path

ALPACA = '{"instruction": "Say hi", "output": "hi"}\n'


def test_doctor_reports_repairs_and_exits_by_what_remains(home, tmp_path, capsys):
    store = Store(db_path(home))
    (home / "runs" / "orphan").mkdir()
    cfg = RunConfig(name="q")
    store.create_run("q", "q", cfg.to_dict(), str(home / "runs" / "q"))  # queued, its directory never made

    assert main(["doctor"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"[orphan-run-dir] orphan: {home / 'runs' / 'orphan'} has no row in the run store. Fix: move it to trash/",
        f"[missing-run-dir] q: queued run's directory {home / 'runs' / 'q'} is gone. "
        "Fix: remove the row; its record and config.yaml are kept in trash/ (`studio train` that file to redo it)",
    ]
    assert err == "2 problem(s) remain. Run `studio doctor --repair` to fix the repairable ones.\n"

    assert main(["doctor", "--repair", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [f["kind"] for f in report["findings"]] == ["orphan-run-dir", "missing-run-dir"]
    assert report["repaired"][1].startswith("removed the row of q (record and config kept in ")
    assert report["remaining"] == []
    assert store.list_runs() == [] and len(list((home / "trash").glob("*/run-q.yaml"))) == 1
    assert main(["doctor"]) == 0
    assert capsys.readouterr().out == "Workspace is healthy: no problems found.\n"


def test_doctor_leaves_a_changed_dataset_to_the_user(home, tmp_path, capsys):
    src = tmp_path / "qa.jsonl"
    src.write_text(ALPACA)
    assert main(["datasets", "add", str(src), "--name", "qa"]) == 0
    (home / "datasets" / "qa" / "data.jsonl").write_text(ALPACA.replace("hi", "ho"))
    capsys.readouterr()
    assert main(["doctor", "--repair"]) == 1
    out, err = capsys.readouterr()
    assert out == (
        "[dataset-hash-mismatch] qa: its stored file data.jsonl changed since registration (sha256 differs from "
        "the entry). Fix: remove it (studio datasets remove qa) and register the original file again\n"
    )
    assert err == "1 problem(s) remain.\n"
