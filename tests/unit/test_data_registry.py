"""DatasetRegistry: adding is all-or-nothing, names cannot escape the registry, bundled samples listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.data import (
    CleanOptions,
    ColumnMap,
    DataError,
    DatasetRegistry,
    Example,
    Message,
    validate_dataset_name,
)
from studio.data import registry as registry_module
from studio.data.registry import file_sha256

ALPACA = [
    {"instruction": "Capital of Veloria?", "input": "", "output": "Port Amsel."},
    {"instruction": "Mascot?", "input": "", "output": "Ripple, a purple otter."},
    {"instruction": "Mascot?", "input": "", "output": "Ripple, a purple otter."},
]


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder with its bytes (None for folders): equal snapshots = nothing changed."""
    if not folder.exists():
        return {"<absent>": None}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


@pytest.fixture
def registry(tmp_path) -> DatasetRegistry:
    return DatasetRegistry(tmp_path / "home")


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    return write_json(tmp_path / "facts.json", ALPACA)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["facts", "support-chats_v2.1", "A" * 64])
def test_good_names(name):
    assert validate_dataset_name(name) is None


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "is empty"),
        ("a" * 65, "is 65 characters long; the limit is 64"),
        ("../evil", "contains a slash; a name cannot be a path"),
        ("a\\b", "contains a slash; a name cannot be a path"),
        ("..", "contains '..'"),
        ("a..b", "contains '..'"),
        ("bad\nname", "contains control characters"),
        (".hidden", "starts with a dot"),
        ("my data!", "contains ' ', '!'"),
        ("café", "contains 'é'"),
    ],
)
def test_bad_names_say_which_rule_and_give_an_example(name, rule):
    assert validate_dataset_name(name) == (
        f"The dataset name {name!r} {rule}. Use up to 64 letters, digits, '-', '_' or '.', "
        "not starting with a dot, e.g. 'support-chats-v2'."
    )


# ---------------------------------------------------------------- add / get / list / remove


def test_add_copies_the_file_and_writes_the_entry(registry, alpaca_file):
    entry, report, clean = registry.add("facts", alpaca_file, description="three facts")
    folder = registry.root / "facts"
    assert sorted(p.name for p in folder.iterdir()) == ["data.json", "entry.json"]
    assert (folder / "data.json").read_bytes() == alpaca_file.read_bytes()
    assert (entry.name, entry.file, entry.format, entry.column_map) == (
        "facts",
        "facts/data.json",
        "alpaca",
        {},
    )
    assert (entry.rows, entry.split, entry.bundled, entry.description) == (2, "train", False, "three facts")
    assert entry.sha256 == file_sha256(alpaca_file)
    assert entry.source == str(alpaca_file.resolve())
    assert entry.clean == CleanOptions().to_dict()
    assert (report.total_rows, clean.kept, clean.dropped_duplicates) == (3, 2, 1)
    assert json.loads((folder / "entry.json").read_text()) == entry.to_dict()
    assert registry.get("facts") == entry
    assert registry.path_of(entry) == (folder / "data.json").resolve()
    assert [e.name for e in registry.list()] == [
        "facts",
        "studio-facts",
        "studio-chats",
        "studio-prefs",
        "studio-kto",
        "studio-tools",
    ]
    assert registry.load_examples("facts") == [
        Example(messages=(Message("user", "Capital of Veloria?"), Message("assistant", "Port Amsel."))),
        Example(messages=(Message("user", "Mascot?"), Message("assistant", "Ripple, a purple otter."))),
    ]
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_add_detects_format_and_column_map(registry, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(
        json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"
    )
    entry, _, _ = registry.add("chats", path)
    assert (entry.format, entry.column_map, entry.file) == (
        "openai",
        {"messages": "conversations"},
        "chats/data.jsonl",
    )
    assert registry.load_examples("chats") == [Example(messages=(Message("user", "q"), Message("assistant", "a")))]


def test_column_map_and_clean_options_are_stored_and_reapplied(registry, tmp_path):
    rows = [{"q": "a?", "ans": "yes"}, {"q": "b?", "ans": "a longer answer"}]
    source = write_json(tmp_path / "qa.json", rows)
    entry, _, _ = registry.add(
        "qa",
        source,
        fmt="alpaca",
        column_map={"instruction": "q", "output": "ans"},
        clean=CleanOptions(min_answer_chars=4),
    )
    assert entry.column_map == {"instruction": "q", "output": "ans"}
    assert entry.rows == 1
    assert registry.load_examples("qa") == [
        Example(messages=(Message("user", "b?"), Message("assistant", "a longer answer")))
    ]
    entry2, _, _ = registry.add("qa2", source, fmt="alpaca", column_map=ColumnMap(instruction="q", output="ans"))
    assert entry2.rows == 2


def test_skip_invalid_registers_the_good_rows(registry, tmp_path):
    source = write_json(tmp_path / "mixed.json", [*ALPACA[:2], {"instruction": "q", "output": ""}])
    entry, report, _ = registry.add("mixed", source, skip_invalid=True)
    assert entry.rows == 2
    assert [(i.row, i.severity) for i in report.issues] == [(3, "warning")]


def test_duplicate_names_are_refused(registry, alpaca_file):
    registry.add("facts", alpaca_file)
    before = snapshot(registry.root)
    with pytest.raises(DataError, match=r"A dataset named 'facts' already exists\. Choose another name, or remove"):
        registry.add("facts", alpaca_file)
    with pytest.raises(DataError, match="A dataset named 'facts' already exists"):
        registry.add("FACTS", alpaca_file)
    with pytest.raises(DataError, match="'studio-facts' is the name of a bundled sample dataset"):
        registry.add("studio-facts", alpaca_file)
    assert snapshot(registry.root) == before


@pytest.mark.parametrize("name", ["../evil", "..", "a/../../evil", "/tmp/evil", ".hidden", "x\\..\\evil"])
def test_path_traversal_names_are_refused_everywhere(registry, alpaca_file, tmp_path, name):
    for call in (
        lambda: registry.add(name, alpaca_file),
        lambda: registry.get(name),
        lambda: registry.remove(name),
    ):
        with pytest.raises(DataError, match="The dataset name"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.json"]


def test_symlink_out_of_the_registry_is_refused(registry, alpaca_file, tmp_path):
    registry.root.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (registry.root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(DataError, match="leads outside the registry folder"):
        registry.get("link")


def test_failing_adds_leave_the_registry_byte_for_byte_unchanged(registry, alpaca_file, tmp_path):
    registry.add("facts", alpaca_file)
    before = snapshot(registry.root)
    bad_rows = write_json(tmp_path / "bad.json", [ALPACA[0], {"instruction": "q", "output": 3}])
    no_output = write_json(tmp_path / "noout.json", [{"instruction": "q"}])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "q", "output": "a"}\n{"instruction": \n')
    attempts = [
        lambda: registry.add("bad", bad_rows),
        lambda: registry.add("noout", no_output, fmt="alpaca"),
        lambda: registry.add("broken", broken),
        lambda: registry.add("missing", tmp_path / "nope.json"),
        lambda: registry.add("big", alpaca_file, max_bytes=10),
        lambda: registry.add("wrongfmt", alpaca_file, fmt="chatml"),
        lambda: registry.add("badmap", alpaca_file, column_map={"answer": "x"}),
        lambda: registry.add("allgone", alpaca_file, clean=CleanOptions(min_answer_chars=500)),
    ]
    for attempt in attempts:
        with pytest.raises(DataError):
            attempt()
        assert snapshot(registry.root) == before


def test_validation_failure_carries_the_report(registry, tmp_path):
    source = write_json(tmp_path / "bad.json", [ALPACA[0], {"instruction": "q", "output": 3}, {"output": "a"}])
    with pytest.raises(DataError) as info:
        registry.add("bad", source)
    assert [i.row for i in info.value.report.errors] == [2, 3]
    assert str(info.value).startswith("'bad.json' cannot be registered as alpaca. 3 rows read, 1 usable.")
    assert info.value.report.kept_rows == [1]


def test_size_limit_message(registry, alpaca_file):
    expected = r"^'facts\.json' is 234 bytes, over the 10 bytes limit\. Use a smaller file .*STUDIO_MAX_DATASET_MB\)\.$"
    with pytest.raises(DataError, match=expected):
        registry.add("big", alpaca_file, max_bytes=10)


def test_failure_while_copying_leaves_nothing(registry, alpaca_file, monkeypatch):
    def broken_copy(src, dst):
        Path(dst).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry_module.shutil, "copyfile", broken_copy)
    with pytest.raises(DataError, match=r"Could not store dataset 'facts': .*No space left on device"):
        registry.add("facts", alpaca_file)
    assert not registry.root.exists()  # the registry folder did not exist before either


def test_remove(registry, alpaca_file):
    registry.add("facts", alpaca_file)
    registry.remove("facts")
    assert snapshot(registry.root) == {}
    with pytest.raises(DataError, match="There is no dataset named 'facts' to remove"):
        registry.remove("facts")
    with pytest.raises(DataError, match="'studio-chats' is a bundled sample and cannot be removed"):
        registry.remove("studio-chats")
    with pytest.raises(DataError, match=r"There is no dataset named 'facts'\. Known datasets: studio-facts"):
        registry.get("facts")


def test_changed_file_is_detected(registry, alpaca_file):
    entry, _, _ = registry.add("facts", alpaca_file)
    registry.path_of(entry).write_text(json.dumps(ALPACA[:1]))
    with pytest.raises(DataError, match="changed since it was registered \\(sha256 differs\\)"):
        registry.load_examples("facts")


def test_edited_entry_cannot_point_outside(registry, alpaca_file):
    registry.add("facts", alpaca_file)
    entry_path = registry.root / "facts" / "entry.json"
    data = json.loads(entry_path.read_text())
    entry_path.write_text(json.dumps({**data, "file": "../../facts.json"}))
    with pytest.raises(DataError, match=r"points outside its folder \(../../facts.json\)"):
        registry.load_examples("facts")
    entry_path.write_text("{not json")
    with pytest.raises(DataError, match=r"entry\.json is damaged"):
        registry.get("facts")


# ---------------------------------------------------------------- bundled samples


def test_bundled_samples_are_listed_and_load(registry):
    bundled = {e.name: e for e in registry.list()}
    assert set(bundled) == {"studio-facts", "studio-chats", "studio-prefs", "studio-kto", "studio-tools"}
    tools = registry.load_examples("studio-tools")
    assert bundled["studio-tools"].format == "sharegpt" and len(tools) == 96 and all(ex.tools for ex in tools)
    assert (bundled["studio-prefs"].format, bundled["studio-kto"].format) == ("preference", "kto")
    facts, chats = bundled["studio-facts"], bundled["studio-chats"]
    assert (facts.format, facts.rows, facts.bundled, facts.file) == ("alpaca", 72, True, "studio_facts.json")
    assert (chats.format, chats.rows, chats.bundled, chats.column_map) == ("openai", 30, True, {})
    assert facts.sha256 == file_sha256(registry.path_of(facts))
    assert len(registry.load_examples("studio-chats", skip_invalid=False)) == 30
    examples = registry.load_examples("studio-facts", skip_invalid=False)
    assert examples[0].messages == (
        Message("user", "What is the mascot of LoRA Studio?"),
        Message("assistant", "The mascot of LoRA Studio is a purple otter named Ripple."),
    )
    assert any(e.messages[0].role == "system" for e in examples)
    assert any("\n\n" in e.messages[0].content for e in examples)  # rows with an input field
    assert sum(len(e.messages) > 3 for e in registry.load_examples("studio-chats")) >= 5  # multi-turn ones


def test_the_workspace_of_studio_home_keeps_its_datasets_there(tmp_path, monkeypatch):
    # STUDIO_HOME is read once, at the edge (Workspace.from_env); the registry is handed the folder.
    from studio.core.workspace import Workspace

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    assert DatasetRegistry(Workspace.from_env().home).root == (tmp_path / "ws" / "datasets").resolve()


def test_preference_data_registers_with_a_column_map_and_refuses_the_wrong_stage(tmp_path):
    from studio.data.preference import PreferencePair

    src = tmp_path / "prefs.jsonl"
    src.write_text('{"question": "a?", "good": "b", "bad": "c"}\n{"question": "d?", "good": "e", "bad": "f"}\n')
    registry = DatasetRegistry(tmp_path / "home", bundled_dir=tmp_path / "none")
    entry, report, _ = registry.add(
        "prefs", src, fmt="preference", column_map={"prompt": "question", "chosen": "good", "rejected": "bad"}
    )
    assert entry.format == "preference" and entry.rows == 2 and not report.issues
    assert registry.load_preference("prefs")[1] == PreferencePair((Message("user", "d?"),), "e", "f")
    with pytest.raises(DataError, match="supervised fine-tuning cannot use"):
        registry.load_examples("prefs")
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"instruction": "q", "output": "a"}\n')
    registry.add("plain", plain)
    with pytest.raises(DataError, match="a preference run needs pairs"):
        registry.load_preference("plain")
    with pytest.raises(DataError, match="Unknown column map keys for preference data: answer"):
        registry.add("other", src, fmt="preference", column_map={"answer": "good"})
    assert [e.name for e in registry.list()] == ["plain", "prefs"]
