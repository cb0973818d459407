"""The export service's side of the JSON-lines report: the command it starts, how it reads lines, and that
a child which never reports is stopped with its whole tree."""

from __future__ import annotations

import sys

import pytest

from studio.core import procs
from studio.services import exporter
from studio.services.exporter import ExportEvent, export_command, export_events, missing_result, parse_event


def test_the_command_is_the_cli_with_json_and_no_shell():
    cmd = export_command("run1", "merged", "/x/out", "bf16", overwrite=True)
    assert cmd[:3] == [sys.executable, "-m", "studio.cli"]
    assert cmd[3:] == ["export", "run1", "--merge", "/x/out", "--dtype", "bf16", "--json", "--zip", "--overwrite"]
    assert export_command("run1", "adapter", "/x/a", make_zip=False)[3:] == [
        "export", "run1", "--adapter", "/x/a", "--dtype", "fp32", "--json",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="kind"):
        export_command("run1", "gguf", "/x")


def test_report_lines_become_events_and_anything_else_is_output():
    assert parse_event('{"type": "progress", "message": "Copying"}') == ExportEvent("progress", "Copying")
    result = parse_event('{"type": "result", "message": "Saved", "out_dir": "/o", "zip": null}')
    assert result.final and result.data == {"out_dir": "/o", "zip": None}
    assert parse_event('{"type": "error", "message": "bad", "code": 2}').data == {"code": 2}
    for line in ("Loading checkpoint shards: 100%", '{"other": 1}', "[1, 2]", '{"type": "debug"}', ""):
        assert parse_event(line) is None


def test_a_child_that_ends_without_a_result_says_how():
    event = missing_result(-9, ["loading", "Killed", "  "])
    assert event.kind == "error" and "killed by SIGKILL" in event.message and event.message.endswith(": Killed")
    assert missing_result(1, []).message == "the export process ended (exit code 1)"


def _fake_cli(script: str):
    return lambda *args, **kwargs: [sys.executable, "-c", script]


def test_a_slow_export_is_stopped_with_its_whole_tree(home, monkeypatch, eval_child_pids):
    # the child reports once, starts a grandchild and hangs: the timeout ends both
    script = (
        "import json, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(json.dumps({'type': 'progress', 'message': 'working'}), flush=True)\n"
        "time.sleep(120)\n"
    )
    monkeypatch.setattr(exporter, "export_command", _fake_cli(script))
    events = list(export_events(home, "run1", "merged", home / "out", timeout_s=3))
    assert [e.kind for e in events] == ["progress", "error"] and "longer than" in events[-1].message
    (pid,) = eval_child_pids
    assert not procs.process_alive(pid) and not procs.child_pids(pid)


def test_a_crash_without_a_report_line_is_an_error_with_its_last_output(home, monkeypatch):
    monkeypatch.setattr(exporter, "export_command", _fake_cli("import sys; print('boom'); sys.exit(3)"))
    events = list(export_events(home, "run1", "adapter", home / "out"))
    assert [e.kind for e in events] == ["error"] and events[0].message.endswith("(exit code 3): boom")
