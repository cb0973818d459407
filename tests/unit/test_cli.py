"""The CLI's contract: exit 0 on success, 2 for bad input, 1 for a failed operation; one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from studio.cli.common import UsageError, _parse_set, load_run_config
from studio.cli.main import main


def test_set_overrides_are_typed():
    assert _parse_set(["train.max_steps=10", "lora.target_modules=[q_proj, v_proj]", "name=x"]) == {
        "train": {"max_steps": 10},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "name": "x",
    }
    with pytest.raises(UsageError):
        _parse_set(["train.max_steps"])


def test_preset_by_name_with_overrides():
    cfg = load_run_config("quick-demo", ["train.max_steps=3", "lora.r=4"])
    assert cfg.train.max_steps == 3 and cfg.lora.r == 4 and cfg.data.datasets == ["studio-facts"]


def test_bad_hyperparameters_exit_2_with_one_line(home, bundled_model_dir, capsys):
    # bundled_model_dir: the one-time conversion's progress bar is not part of the error output under test
    code = main(["train", "quick-demo", "--set", "lora.r=0", "--set", "train.learning_rate=-1", "--detach"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:")
    assert "lora.r" in err and "train.learning_rate" in err
    assert list((home / "runs").iterdir()) == []  # nothing half-created


def test_unknown_run_exits_2(home, capsys):
    assert main(["run", "nope"]) == 2
    assert "No run 'nope'" in capsys.readouterr().err


def test_detached_train_queues_a_run_and_runs_lists_it(home, capsys, monkeypatch):
    monkeypatch.setenv("STUDIO_SLOTS", "0")  # queue only: no worker starts in a unit test
    assert main(["train", "quick-demo", "--detach"]) == 0
    capsys.readouterr()
    assert main(["runs", "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    assert run["status"] == "queued" and run["datasets"] == "studio-facts"
    assert main(["abort", run["id"]]) == 0
    assert main(["abort", run["id"]]) == 1  # already aborted: the operation fails, with a reason


def test_datasets_add_list_show_remove(home, tmp_path, capsys):
    src = tmp_path / "qa.jsonl"
    src.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": "d"}\n')
    cols = json.dumps({"instruction": "question", "output": "answer"})
    assert main(["datasets", "add", str(src), "--name", "qa", "--format", "alpaca", "--columns", cols]) == 0
    assert "registered 'qa': 2 rows" in capsys.readouterr().out
    assert main(["datasets", "list"]) == 0
    listing = capsys.readouterr().out
    assert "qa" in listing and "studio-facts" in listing
    assert main(["datasets", "show", "qa"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2
    assert main(["datasets", "add", str(src), "--name", "qa"]) == 2  # duplicate name
    assert main(["datasets", "remove", "qa"]) == 0


def test_datasets_add_takes_preference_and_kto_files(home, tmp_path, capsys):
    from studio.cli.main import DATASET_FORMATS
    from studio.data import FORMATS, DatasetRegistry
    from studio.data.preference import PREFERENCE_FORMATS

    assert (*FORMATS, *PREFERENCE_FORMATS) == DATASET_FORMATS
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"prompt": "a?", "chosen": "b", "rejected": "c"}\n{"prompt": "d?", "chosen": "e", "rejected": "f"}\n'
    )
    assert main(["datasets", "add", str(pairs), "--name", "prefs"]) == 0  # detected
    assert "registered 'prefs': 2 rows, format preference" in capsys.readouterr().out
    one_sided = tmp_path / "kto.jsonl"
    one_sided.write_text('{"prompt": "a?", "completion": "b", "label": true}\n')
    assert main(["datasets", "add", str(one_sided), "--name", "k", "--format", "kto"]) == 2
    assert "every answer is labelled desirable (true)" in capsys.readouterr().err
    assert [e.name for e in DatasetRegistry(home).list() if not e.bundled] == ["prefs"]  # nothing half-registered


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "studio.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("serve", "train", "runs", "datasets", "export"):
        assert command in out.stdout


def test_a_preset_file_path_and_a_saved_run_config_both_load(tmp_path):
    from studio.core.config import RunConfig

    by_path = load_run_config(str(Path(__file__).resolve().parents[2] / "presets" / "quick-demo.yaml"))
    assert by_path == load_run_config("quick-demo")
    full = tmp_path / "config.yaml"
    by_path.save(full)
    assert load_run_config(str(full)) == by_path
    with pytest.raises(Exception, match="does not exist"):
        load_run_config(str(tmp_path / "missing.yaml"))
    assert isinstance(by_path, RunConfig)


def _adapter_folder(path: Path) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text('{"base_model_name_or_path": "bundled"}')
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    return path


def test_export_output_is_unchanged_without_json(tmp_path, capsys):
    adapter = _adapter_folder(tmp_path / "adapter")
    assert main(["export", str(adapter), "--adapter", str(tmp_path / "out"), "--zip"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"Saved to {tmp_path / 'out'} (") and lines[-1] == f"zip: {tmp_path / 'out.zip'}"
    assert any(line.startswith("adapter_model.safetensors  ") for line in lines)


def test_export_json_reports_progress_then_one_result(tmp_path, capsys):
    adapter = _adapter_folder(tmp_path / "adapter")
    assert main(["export", str(adapter), "--adapter", str(tmp_path / "out"), "--zip", "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["type"] for e in events] == ["progress", "progress", "progress", "result"]
    result = events[-1]
    assert result["out_dir"] == str(tmp_path / "out") and result["zip"] == str(tmp_path / "out.zip")
    assert ["adapter_model.safetensors", 7] in result["files"] and result["message"].startswith("Saved to")


def test_export_json_errors_are_a_line_too_with_the_usual_exit_code(tmp_path, capsys):
    assert main(["export", "x", "--json"]) == 2
    out, err = capsys.readouterr()
    (event,) = [json.loads(line) for line in out.splitlines()]
    assert event["type"] == "error" and event["code"] == 2 and "--merge OUT_DIR" in event["message"]
    assert err.startswith("error: say what to export")
    assert main(["export", str(tmp_path), "--adapter", str(tmp_path / "o"), "--json"]) == 1
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["type"] == "error" and last["code"] == 1 and "holds no adapter" in last["message"]


def test_a_stage_and_its_settings_come_from_set_overrides():
    config = load_run_config("quick-demo", ["stage=dpo", "preference.beta=0.2", "data.datasets=[studio-prefs]"])
    assert (config.stage, config.preference.beta, config.data.datasets) == ("dpo", 0.2, ["studio-prefs"])
    assert load_run_config("quick-dpo", []).stage == "dpo"
