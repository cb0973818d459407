"""Bad input, one case per row: the CLI and the UI both name the problem and the fix, and the workspace
(every file under STUDIO_HOME, and the store's rows) is byte-for-byte what it was before."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from studio.cli.main import main
from studio.core.config import ConfigError, RunConfig, merge_dicts
from studio.core.workspace import db_path
from studio.data import CleanOptions
from studio.runs.queue import JobManager
from studio.ui import datasets as D
from studio.ui import train as T
from studio.ui.common import UIContext


def snapshot(home: Path) -> dict:
    """Every file's bytes under the workspace, plus every row of the store (WAL side files change on reads)."""
    files = {
        str(p.relative_to(home)): p.read_bytes()
        for p in sorted(home.rglob("*"))
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }
    rows = {}
    if db_path(home).is_file():
        with sqlite3.connect(db_path(home)) as conn:
            for table in ("runs", "metrics", "events"):
                rows[table] = conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    files.pop("studio.db", None)  # its pages may be checkpointed from the WAL; its rows are compared instead
    return {"files": files, "rows": rows, "dirs": sorted(str(p.relative_to(home)) for p in home.rglob("*"))}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err


# -- datasets ----------------------------------------------------------------------------------------------


@dataclass
class DataCase:
    file: str
    content: bytes
    problem: str  # a piece of the message naming what is wrong
    fix: str  # a piece naming what to do
    name: str = "new-data"
    cli_args: list[str] = field(default_factory=list)
    ui_kwargs: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)


ALPACA = b'{"instruction": "Say hi", "output": "hi"}\n'
SG = '{{"conversations": [{{"from": "human", "value": "hi"}}, {{"from": "{second}", "value": "yo"}}]}}\n'

DATA_CASES = {
    "empty-file": DataCase("empty.jsonl", b"", "is empty (0 bytes)", "Choose the file that holds your rows"),
    "not-utf8": DataCase(
        "latin1.jsonl",
        '{"instruction": "café", "output": "x"}\n'.encode("latin-1"),
        "is not UTF-8 text",
        "UTF-8 encoding",
    ),
    "binary-with-json-name": DataCase(
        "image.json", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "contains binary data (NUL bytes)", "re-export"
    ),
    "truncated-json": DataCase(
        "cut.json", b'[{"instruction": "a", "output": "b"}, {"instruction": "c", "out', "is not valid JSON", "truncated"
    ),
    "jsonl-one-bad-line": DataCase(
        "bad-line.jsonl", ALPACA + b'{"instruction": "x", "output": \n' + ALPACA, "Line 2 of", "fix or delete that line"
    ),
    "csv-missing-columns": DataCase(
        "qa.csv",
        b"question,answer\nWhat?,That.\n",
        "the alpaca format needs the column 'instruction', 'output'",
        "Give a column map",
        cli_args=["--format", "alpaca"],
        ui_kwargs={"fmt": "alpaca"},
    ),
    "wrong-type-number": DataCase(
        "num.jsonl", b'{"instruction": 42, "output": "x"}\n', "'instruction' must be text, got a number", "quotes"
    ),
    "wrong-type-nested": DataCase(
        "nested.jsonl",
        b'{"instruction": "q", "output": {"a": 1}}\n',
        "'output' must be text, got an object",
        "write the text itself",
    ),
    "all-rows-cleaned-away": DataCase(
        "short.jsonl",
        ALPACA + b'{"instruction": "Say yo", "output": "yo"}\n',
        "Cleaning removed all 2 examples",
        "lower min_answer_chars",
        cli_args=["--min-answer-chars", "50"],
        ui_kwargs={"clean": CleanOptions(min_answer_chars=50)},
    ),
    "name-empty": DataCase("ok.jsonl", ALPACA, "The dataset name '' is empty", "Use up to 64 letters", name=""),
    "name-duplicate": DataCase("ok.jsonl", ALPACA, "A dataset named 'taken' already exists", "Choose another", "taken"),
    "name-slash": DataCase("ok.jsonl", ALPACA, "contains a slash", "Use up to 64 letters", name="a/b"),
    "name-dotdot": DataCase("ok.jsonl", ALPACA, "contains '..'", "Use up to 64 letters", name="a..b"),
    "name-control-chars": DataCase("ok.jsonl", ALPACA, "contains control characters", "Use up to", name="a\x07b"),
    "file-over-size-limit": DataCase(
        "big.jsonl",
        ALPACA * 10,
        "'big.jsonl' is 420 bytes, over the 209 bytes limit",
        "raise the limit (STUDIO_MAX_DATASET_MB)",
        env={"STUDIO_MAX_DATASET_MB": "0.0002"},
    ),
    "parquet-not-parquet": DataCase(
        "rows.parquet", ALPACA, "is not a Parquet file", "It looks like JSON: rename it to .json or .jsonl"
    ),
    "sharegpt-not-alternating": DataCase(
        "sg.jsonl", SG.format(second="human").encode(), "turns must alternate", "Merge or remove the extra message"
    ),
    "sharegpt-unknown-role": DataCase(
        "sg.jsonl", SG.format(second="wizard").encode(), "unknown role 'wizard'", "Expected one of: 'human', 'gpt'"
    ),
}


@pytest.fixture
def taken(home, tmp_path):
    """A workspace that already holds one registered dataset, so 'unchanged' is not trivially an empty folder."""
    src = tmp_path / "taken.jsonl"
    src.write_bytes(ALPACA)
    assert main(["datasets", "add", str(src), "--name", "taken"]) == 0
    return home


@pytest.mark.parametrize("case", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_bad_dataset_is_refused_with_the_fix_and_changes_nothing(case, taken, tmp_path, capsys, monkeypatch):
    home = taken
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    src = tmp_path / "in" / case.file
    src.parent.mkdir()
    src.write_bytes(case.content)
    capsys.readouterr()
    before = snapshot(home)

    code = main(["datasets", "add", str(src), "--name", case.name, *case.cli_args])
    err = one_error_line(capsys)
    assert code == 2
    assert case.problem in err and case.fix in err

    message, table, select = D.register_dataset(home, str(src), name=case.name, **case.ui_kwargs)
    assert message.startswith("**Error:**")
    assert case.problem in " ".join(message.split()) and case.fix in " ".join(message.split())
    assert table == {"__type__": "update"} and select == {"__type__": "update"}  # the list is left as it is

    assert snapshot(home) == before


def test_size_limit_env_is_checked(home, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STUDIO_MAX_DATASET_MB", "lots")
    src = tmp_path / "ok.jsonl"
    src.write_bytes(ALPACA)
    assert main(["datasets", "add", str(src), "--name", "ok"]) == 2
    assert one_error_line(capsys) == (
        "error: STUDIO_MAX_DATASET_MB='lots' is not a size in MiB. "
        "Set it to a positive number (e.g. 500) or unset it.\n"
    )


# -- models and hyperparameters ------------------------------------------------------------------------------


TRAIN_CASES = {
    # overrides over a valid config on the tiny model; {tiny} is its folder, {tmp} a scratch folder
    "model-path-missing": (
        {"model": {"source": "{tmp}/no-such-model"}},
        ["Model folder '{tmp}/no-such-model' does not exist. Give the folder that holds config.json."],
    ),
    "model-path-not-a-model": (
        {"model": {"source": "{tmp}"}},
        ["'{tmp}' is not a model folder: it has no config.json. Give a folder saved by save_pretrained"],
    ),
    "hub-id-offline": (
        {"model": {"source": "some-org/some-model"}},
        ["Hub model 'some-org/some-model' is not available: the hub is offline here (HF_HUB_OFFLINE=1)"],
    ),
    "rank-0": ({"lora": {"r": 0}}, ["lora.r must be a whole number of at least 1 (got 0); try 8, 16 or 32."]),
    "negative-lr": (
        {"train": {"learning_rate": -0.001}},
        ["train.learning_rate must be in (0, 1) (got -0.001); 2e-4 is a good start."],
    ),
    "dropout-1.5": ({"lora": {"dropout": 1.5}}, ["lora.dropout must be in [0, 1) (got 1.5); 0.05-0.1 is typical."]),
    "batch-0": ({"train": {"batch_size": 0}}, ["train.batch_size must be a whole number of at least 1 (got 0)."]),
    "alpha-not-a-number": (
        {"lora": {"alpha": "abc"}},
        ["lora.alpha must be a positive number (got 'abc'); 2*r is usual."],
    ),
    "target-module-missing": (
        {"lora": {"target_modules": ["q_proj", "nope_proj"]}},
        [
            "lora.target_modules: nope_proj not found in this model. Its linear layers are: q_proj, k_proj, v_proj, "
            "o_proj, gate_proj, up_proj, down_proj; or use 'all-linear'."
        ],
    ),
    "all-problems-at-once": (
        {"lora": {"r": 0, "target_modules": ["nope_proj"]}, "train": {"batch_size": 0}},
        ["lora.r must be", "train.batch_size must be", "lora.target_modules: nope_proj not found"],
    ),
}


def _fill(value, tiny: Path, tmp: Path):
    if isinstance(value, dict):
        return {k: _fill(v, tiny, tmp) for k, v in value.items()}
    if isinstance(value, str):
        return value.format(tiny=tiny, tmp=tmp)
    return value


@pytest.fixture
def train_home(home, monkeypatch):
    monkeypatch.setenv("STUDIO_SLOTS", "0")  # a config that wrongly passed would only queue
    JobManager(home).store.close()  # the store exists before the snapshot, as in any used workspace
    return home


@pytest.mark.parametrize(("overrides", "expected"), TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_bad_run_config_is_refused_before_a_run_exists(
    overrides, expected, train_home, tiny_model_dir, tmp_path, capsys
):
    home = train_home
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    base = {"model": {"source": str(tiny_model_dir)}, "data": {"datasets": ["studio-facts"]}, "train": {"max_steps": 2}}
    data = merge_dicts(base, _fill(overrides, tiny_model_dir, scratch))
    expected = [e.format(tmp=scratch) for e in expected]
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(data))
    before = snapshot(home)

    assert main(["train", str(config_file), "--detach"]) == 2
    err = one_error_line(capsys)
    assert all(e in err for e in expected), err

    message, run_id = T.start_training(UIContext(home), T.form_from_config(RunConfig.from_dict(data)))
    assert run_id is None and message.startswith("**Please fix:**")
    assert all(e in message for e in expected), message

    assert snapshot(home) == before
    assert list((home / "runs").iterdir()) == []


def test_preset_with_unknown_keys_names_the_key(train_home, tmp_path, capsys):
    home = train_home
    preset = tmp_path / "bad.yaml"
    preset.write_text("description: typo\nlora:\n  rank: 8\n")
    expected = "Unknown key 'lora.rank' (known keys here: r, alpha, dropout,"
    before = snapshot(home)

    assert main(["train", str(preset), "--detach"]) == 2
    assert expected in one_error_line(capsys)

    with pytest.raises(ConfigError) as raised:  # the preset picker shows ConfigError's problems (on_preset)
        T.apply_preset(str(preset), [], [])
    assert expected in T.error_message(raised.value)
    message, run_id = T.start_preset_run(UIContext(home), str(preset), "studio-facts", 2, "x")
    assert run_id is None and expected in message

    assert snapshot(home) == before
