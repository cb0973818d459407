"""LLaMA-Factory dataset_info.json: mapping entries, importing files, and why others were skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.core.workspace import bundled_datasets_dir
from studio.data import ColumnMap, DataError, DatasetRegistry, import_dataset_info, map_entry
from studio.data.preference import PreferenceColumns

OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"file_name": "a.json"}, ("alpaca", ColumnMap())),
        (
            {"columns": {"prompt": "q", "query": "ctx", "response": "a", "history": "h", "system": "s"}},
            ("alpaca", ColumnMap(instruction="q", input="ctx", output="a", history="h", system="s")),
        ),
        ({"columns": {"prompt": "text"}}, ("text", ColumnMap(text="text"))),
        ({"formatting": "sharegpt"}, ("sharegpt", ColumnMap())),
        (
            {"formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": OPENAI_TAGS},
            ("openai", ColumnMap()),
        ),
        (
            {"formatting": "sharegpt", "tags": OPENAI_TAGS},
            ("openai", ColumnMap(messages="conversations")),
        ),
        (
            {
                "formatting": "sharegpt",
                "columns": {"messages": "chat", "system": "sys"},
                "tags": {"role_tag": "speaker", "user_tag": "Q"},
            },
            ("sharegpt", ColumnMap(messages="chat", system="sys", role_tag="speaker", user_tag="Q")),
        ),
    ],
)
def test_map_entry(spec, expected):
    assert map_entry(spec) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"file_name": "a.json", "ranking": True}, ("preference", PreferenceColumns())),
        (
            {"ranking": True, "columns": {"prompt": "q", "query": "ctx", "chosen": "good", "rejected": "bad"}},
            ("preference", PreferenceColumns(instruction="q", input="ctx", chosen="good", rejected="bad")),
        ),
        (
            {"formatting": "sharegpt", "ranking": True, "columns": {"messages": "conversations", "chosen": "chosen"}},
            ("preference", PreferenceColumns()),
        ),
        (
            {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"}, "tags": OPENAI_TAGS},
            ("kto", PreferenceColumns()),  # both are names the parser reads anyway
        ),
        ({"formatting": "sharegpt", "columns": {"kto_tag": "kto_tag"}}, ("kto", PreferenceColumns())),
        (
            {"columns": {"prompt": "q", "kto_tag": "ok"}},
            ("kto", PreferenceColumns(instruction="q", label="ok", completion="output")),
        ),
    ],
)
def test_ranking_and_kto_entries_map_to_preference_formats(spec, expected):
    assert map_entry(spec) == expected


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (
            {"hf_hub_url": "org/ds"},
            "it is fetched from a hub or the cloud (hf_hub_url), which is not reachable",
        ),
        ({"ms_hub_url": "org/ds"}, "(ms_hub_url)"),
        ({"script_url": "x"}, "(script_url)"),
        ({"cloud_file_name": "s3://b/x.json"}, "(cloud_file_name)"),
        ({"file_name": "a.json", "ranking": True, "columns": {"response": "r"}}, "a ranking entry has no 'response'"),
        (
            {"formatting": "sharegpt", "ranking": True, "tags": {"role_tag": "speaker"}},
            "its tags (role_tag='speaker') are not the usual sharegpt or openai names",
        ),
        ({"formatting": "openai"}, "formatting 'openai' is not supported; use 'alpaca' or 'sharegpt'."),
        ({"formatting": "sharegpt", "columns": {"videos": "v"}}, "it uses the column(s) videos: images, audio"),
        ({"columns": {"prompt": "p", "images": "img"}}, "it uses the column(s) images"),
        (
            {"columns": {"prompt": "p", "answer": "a"}},
            "unknown column key(s) for alpaca: answer; expected some of",
        ),
    ],
)
def test_map_entry_refusals(spec, reason):
    with pytest.raises(DataError) as info:
        map_entry(spec)
    assert reason in str(info.value)


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")


def test_import_registers_usable_entries_and_explains_the_rest(tmp_path):
    data = tmp_path / "lf"
    data.mkdir()
    write(data / "alpaca.jsonl", [{"q": "Capital?", "a": "Port Amsel."}])
    write(
        data / "chat.jsonl",
        [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
    )
    write(
        data / "oai.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    write(data / "bad.jsonl", [{"instruction": "q", "output": 1}, {"instruction": "q"}])
    write(data / "taken.jsonl", [{"instruction": "q", "output": "a"}])
    info = {
        "my_alpaca": {"file_name": "alpaca.jsonl", "columns": {"prompt": "q", "response": "a"}},
        "my_chat": {"file_name": "chat.jsonl", "formatting": "sharegpt"},
        "my_oai": {
            "file_name": "oai.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": OPENAI_TAGS,
        },
        "hub": {"hf_hub_url": "org/ds"},
        "prefs": {"file_name": "alpaca.jsonl", "ranking": True},
        "gone": {"file_name": "gone.json"},
        "pics": {"file_name": "alpaca.jsonl", "columns": {"prompt": "q", "images": "img"}},
        "bad": {"file_name": "bad.jsonl"},
        "taken": {"file_name": "taken.jsonl"},
        "bad/name": {"file_name": "taken.jsonl"},
    }
    (data / "dataset_info.json").write_text(json.dumps(info))
    registry = DatasetRegistry(tmp_path / "home", bundled_dir=tmp_path / "no-bundled")
    registry.add("taken", data / "taken.jsonl")

    report = import_dataset_info(registry, data / "dataset_info.json")

    assert report.registered == ["my_alpaca", "my_chat", "my_oai"]
    reasons = dict(report.skipped)
    assert list(reasons) == ["hub", "prefs", "gone", "pics", "bad", "taken", "bad/name"]
    assert reasons["hub"].startswith("it is fetched from a hub or the cloud (hf_hub_url)")
    # a ranking entry is registered as preference data; this one's file has no pairs, and it says so
    assert reasons["prefs"].startswith("'alpaca.jsonl' cannot be registered as preference.")
    assert "row 1: 'chosen' is missing" in reasons["prefs"]
    assert reasons["gone"] == "its file 'gone.json' was not found next to dataset_info.json."
    assert reasons["pics"].startswith("it uses the column(s) images")
    assert reasons["bad"].startswith("'bad.jsonl' cannot be registered as alpaca. 2 rows read, 0 usable.")
    assert "row 1: 'output' must be text, got a number (1)" in reasons["bad"]
    assert "row 2: 'output' is missing (no value)" in reasons["bad"]
    assert reasons["taken"].startswith("A dataset named 'taken' already exists")
    assert reasons["bad/name"].startswith("The dataset name 'bad/name' contains a slash")

    assert registry.get("my_oai").format == "openai"
    assert registry.get("my_chat").format == "sharegpt"
    assert registry.get("my_alpaca").column_map == {"instruction": "q", "output": "a"}
    assert [m.content for m in registry.load_examples("my_alpaca")[0].messages] == ["Capital?", "Port Amsel."]


def test_bundled_dataset_info_imports_cleanly(tmp_path):
    registry = DatasetRegistry(tmp_path / "home", bundled_dir=tmp_path / "no-bundled")
    report = import_dataset_info(registry, bundled_datasets_dir() / "dataset_info.json")
    assert (report.registered, report.skipped) == (
        ["studio-facts", "studio-chats", "studio-prefs", "studio-kto", "studio-tools"],
        [],
    )
    # sorted by name: studio-chats, studio-facts, studio-kto, studio-prefs, studio-tools
    assert [(e.format, e.rows) for e in registry.list()] == [
        ("openai", 30),
        ("alpaca", 72),
        ("kto", 72),
        ("preference", 72),
        ("sharegpt", 96),
    ]


def test_bundled_names_are_taken_in_a_normal_registry(tmp_path):
    report = import_dataset_info(DatasetRegistry(tmp_path / "home"), bundled_datasets_dir() / "dataset_info.json")
    assert report.registered == []
    assert [name for name, _ in report.skipped] == [
        "studio-facts",
        "studio-chats",
        "studio-prefs",
        "studio-kto",
        "studio-tools",
    ]
    assert "bundled sample" in report.skipped[0][1]


def test_unreadable_info_file(tmp_path):
    registry = DatasetRegistry(tmp_path / "home")
    with pytest.raises(DataError, match=r"does not exist\. Give the path of a LLaMA-Factory dataset_info\.json"):
        import_dataset_info(registry, tmp_path / "dataset_info.json")
    (tmp_path / "dataset_info.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="must hold a JSON object of dataset name -> entry"):
        import_dataset_info(registry, tmp_path / "dataset_info.json")


def test_import_registers_ranking_and_kto_entries(tmp_path):
    """LLaMA-Factory's dpo_en_demo / kto_en_demo shapes: a ranking sharegpt entry and a kto_tag one."""
    data = tmp_path / "lf"
    data.mkdir()
    turn = [{"from": "human", "value": "What is the mascot?"}]
    write(
        data / "dpo.jsonl",
        [
            {
                "conversations": turn,
                "chosen": {"from": "gpt", "value": "Ripple."},
                "rejected": {"from": "gpt", "value": "A cat."},
            }
        ],
    )
    write(
        data / "kto.jsonl",
        [
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}], "label": True},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}], "label": False},
        ],
    )
    info = {
        "dpo_demo": {"file_name": "dpo.jsonl", "formatting": "sharegpt", "ranking": True,
                     "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "kto_demo": {"file_name": "kto.jsonl", "formatting": "sharegpt",
                     "columns": {"messages": "messages", "kto_tag": "label"}, "tags": OPENAI_TAGS},
    }  # fmt: skip
    (data / "dataset_info.json").write_text(json.dumps(info))
    registry = DatasetRegistry(tmp_path / "home", bundled_dir=tmp_path / "no-bundled")

    report = import_dataset_info(registry, data / "dataset_info.json")

    assert report.registered == ["dpo_demo", "kto_demo"], report.skipped
    assert registry.get("dpo_demo").format == "preference" and registry.get("kto_demo").format == "kto"
    (pair,) = registry.load_preference("dpo_demo")
    assert (pair.chosen, pair.rejected) == ("Ripple.", "A cat.")
    assert [item.desirable for item in registry.load_preference("kto_demo")] == [True, False]
