"""The Datasets tab's callbacks, called as plain functions against a temporary workspace."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from studio.data import DatasetRegistry
from studio.ui import datasets as ui

EOS = "<|im_end|>"
MARKED = re.compile(re.escape(ui.TRAIN_OPEN) + "(.*?)" + re.escape(ui.TRAIN_CLOSE), re.S)


@pytest.fixture(autouse=True)
def _bundled_tokenizer(bundled_model_dir):
    """The tab loads the bundled tokenizer itself; make sure the converted model exists first."""


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def updates_by_field(updates: list[dict]) -> dict[str, dict]:
    return dict(zip(ui.COLUMN_FIELDS, updates, strict=True))


def check(file: str, fmt: str = "auto", cutoff: int = 512, skip_invalid: bool = False, **columns):
    return ui.check_dataset(file, "", fmt, cutoff, skip_invalid, **columns)


def test_columns_of_the_file_fill_the_dropdowns(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Hi?", "a": "Hello.", "note": "x"}])
    fields = updates_by_field(ui.fill_columns(f, "", "alpaca"))
    for name in ("instruction", "input", "output", "system", "history"):
        assert fields[name]["visible"] is True
        assert fields[name]["choices"] == ["q", "a", "note"]
        assert fields[name]["value"] == ""  # the usual name is not in the file: the user picks
    assert fields["messages"]["visible"] is False and fields["text"]["visible"] is False


def test_detected_chat_file_fills_columns_and_tags(tmp_path):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    fields = updates_by_field(ui.fill_columns(None, write_jsonl(tmp_path / "c.jsonl", [row]), "auto"))
    assert fields["messages"]["value"] == "conversations"
    assert fields["role_tag"]["choices"] == ["from", "value"] and fields["role_tag"]["value"] == "from"
    assert fields["user_tag"]["choices"] == ["human", "gpt"] and fields["assistant_tag"]["value"] == "gpt"
    assert fields["instruction"]["visible"] is False


def test_an_upload_wins_over_a_server_path(tmp_path):
    upload = write_jsonl(tmp_path / "up.jsonl", [{"text": "a"}])
    typed = write_jsonl(tmp_path / "typed.jsonl", [{"instruction": "b", "output": "c"}])
    assert ui.source_path(upload, typed) == Path(upload)
    assert ui.source_path(None, f"  {typed} ") == Path(typed)


def test_preview_marks_exactly_the_answer_and_eos(tmp_path, tokenizer):
    rows = [{"instruction": f"Question {i}?", "output": f"Answer number {i}."} for i in range(10)]
    message, preview, _, _ = check(write_jsonl(tmp_path / "a.jsonl", rows))
    assert "Ready to register" in message and "**alpaca** (detected)" in message
    assert len(preview) == ui.PREVIEW_ROWS
    for _, shown in preview.iterrows():
        answer = rows[shown["row"] - 1]["output"]
        assert MARKED.findall(shown["text"]) == [answer + EOS]
        assert f"Question {shown['row'] - 1}?" in shown["text"]
        assert shown["trained tokens"] == len(tokenizer(answer + EOS, add_special_tokens=False)["input_ids"])


def test_preview_marks_every_answer_of_a_conversation(tmp_path):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    _, preview, _, _ = check(write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}]))
    assert MARKED.findall(preview.loc[0, "text"]) == ["Hello there." + EOS, "Goodbye." + EOS]


def test_stats_are_exact_for_a_known_file(tmp_path, tokenizer):
    texts = ["one", "two words here", "a somewhat longer text with more words in it", "x " * 40]
    lengths = sorted(len(tokenizer(t.strip() + EOS, add_special_tokens=False)["input_ids"]) for t in texts)
    cutoff = lengths[2]  # only the longest is over it
    _, _, stats, fig = check(write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts]), cutoff=cutoff)
    assert lengths[2] < lengths[3], "the test needs exactly one text over the cutoff"
    p95 = lengths[math.ceil(0.95 * len(lengths)) - 1]
    mean = sum(lengths) / len(lengths)
    row = f"| 4 | {lengths[0]} | {statistics.median(lengths):g} | {p95} | {lengths[-1]} | {mean:.1f} | 25.0% |"
    assert f"longer than {cutoff}" in stats
    assert row in stats
    assert sum(sum(trace.y) for trace in fig.data) == 4


def test_histogram_draws_the_cutoff_line():
    fig = ui.length_histogram([10, 20, 20, 30, 900], cutoff=512)
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(lines) == 1 and lines[0].x0 == 512 and lines[0].x1 == 512
    assert sum(fig.data[0].y) == 5
    assert ui.length_histogram([], cutoff=64).layout.shapes[0].x0 == 64


def test_bad_rows_are_listed_with_their_numbers(tmp_path):
    rows = [
        {"instruction": "Good?", "output": "Yes."},
        {"instruction": "No answer", "output": None},
        {"instruction": "Fine?", "output": "Fine."},
        {"instruction": "", "output": "An answer without a question."},
    ]
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    message, preview, _, _ = check(f)
    assert "2 problems to fix" in message
    assert "**row 2**" in message and "**row 4**" in message and "'instruction' is empty" in message
    assert list(preview["row"]) == [1, 3]  # the good rows are still previewed, with their file numbers

    message, _, _, _ = check(f, skip_invalid=True)
    assert "Ready to register" in message and "**row 2** (skipped)" in message


def test_many_bad_rows_are_summarised(tmp_path):
    rows = [{"instruction": "q", "output": ""} for _ in range(30)] + [{"instruction": "q", "output": "a"}]
    message, _, _, _ = check(write_jsonl(tmp_path / "many.jsonl", rows))
    assert "**row 20**" in message and "**row 21**" not in message
    assert "… and 10 more" in message


def test_unreadable_file_shows_the_engine_message(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json\n', encoding="utf-8")
    message, preview, stats, fig = check(str(bad))
    assert message.startswith("**Error:**") and "Line 2" in message
    assert preview.empty and stats == "" and fig is None
    assert "Choose a file" in ui.check_dataset(None, "")[0]
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "a"}])
    assert "Unknown dataset format 'csv'" in check(good, fmt="csv")[0]


def test_dropdown_column_map_is_used(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Hi?", "a": "Hello."}])
    _, preview, _, _ = check(f, fmt="alpaca", instruction="q", output="a")
    assert MARKED.findall(preview.loc[0, "text"]) == ["Hello." + EOS]


def test_register_then_list(home, tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Hi?", "a": "Hello."}, {"q": "Bye?", "a": "Bye."}])
    message, table, select = ui.register_dataset(home, f, "", "alpaca", "greetings", "two rows", False)
    assert message.startswith("**Error:**")  # no column map: the engine says which columns are missing
    message, table, select = ui.register_dataset(
        home, f, "", "alpaca", " greetings ", "two rows", False, instruction="q", output="a"
    )
    assert "Registered 'greetings'" in message and "2 examples" in message
    assert table.loc[table["name"] == "greetings", ["format", "rows", "bundled", "description"]].values.tolist() == [
        ["alpaca", 2, False, "two rows"]
    ]
    assert select["value"] == "greetings" and "studio-facts" in select["choices"]
    entry = DatasetRegistry(home).get("greetings")
    assert entry.column_map == {"instruction": "q", "output": "a"}
    listed, select, _ = ui.list_datasets(home)
    assert {"greetings", "studio-facts", "studio-chats"} <= set(listed["name"])
    assert listed.set_index("name").loc["studio-facts", "bundled"]


def test_duplicate_name_gives_the_engine_message_and_changes_nothing(home, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    ui.register_dataset(home, f, "", "auto", "mine")
    before = [e.to_dict() for e in DatasetRegistry(home).list()]
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "other"}, {"text": "rows"}])
    message, table, select = ui.register_dataset(home, other, "", "auto", "mine")
    assert message == "**Error:** A dataset named 'mine' already exists. Choose another name, or remove it first."
    assert table == {"__type__": "update"} and select == {"__type__": "update"}
    assert [e.to_dict() for e in DatasetRegistry(home).list()] == before


def test_register_failure_shows_the_validation_summary(home, tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ""}])
    message, table, _ = ui.register_dataset(home, f, "", "auto", "bad")
    assert "cannot be registered as alpaca" in message and "row 2" in message
    assert table == {"__type__": "update"}
    assert "bad" not in [e.name for e in DatasetRegistry(home).list()]


def test_a_server_path_is_registered_from_where_it_is(home, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    message, _, _ = ui.register_dataset(home, None, f, "text", "by-path")
    assert "Registered 'by-path'" in message
    assert DatasetRegistry(home).get("by-path").source == str(Path(f).resolve())


def test_deleting_a_bundled_sample_is_refused(home):
    message, table, select, entry = ui.delete_dataset(home, "studio-facts")
    assert "bundled sample and cannot be removed" in message
    assert table == select == entry == {"__type__": "update"}
    assert "studio-facts" in [e.name for e in DatasetRegistry(home).list()]


def test_delete_a_registered_dataset(home, tmp_path):
    ui.register_dataset(home, write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}]), "", "auto", "gone-soon")
    message, table, select, entry = ui.delete_dataset(home, "gone-soon")
    assert message == "Deleted 'gone-soon'."
    assert "gone-soon" not in set(table["name"]) and "gone-soon" not in select["choices"]
    assert entry is None


def test_inspect_a_bundled_sample(home):
    entry, message, preview, stats, fig = ui.inspect_dataset(home, "studio-chats", 512)
    assert entry["name"] == "studio-chats" and entry["bundled"] is True
    assert "bundled sample" in message
    assert list(preview["row"]) == list(range(1, ui.PREVIEW_ROWS + 1))
    assert all(MARKED.search(text) for text in preview["text"])
    assert f"| {entry['rows']} |" in stats
    assert fig.layout.shapes[0].x0 == 512
    assert "no dataset named" in ui.inspect_dataset(home, "nope", 512)[1]


def test_build_inside_blocks(home):
    import gradio as gr

    from studio.ui.common import UIContext

    with gr.Blocks() as demo, gr.Tab("Datasets") as tab:
        ui.build(UIContext(home), tab)
    ids = {block.elem_id for block in demo.blocks.values()}
    expected = {"ds-upload", "ds-path", "ds-format", "ds-check", "ds-message", "ds-preview", "ds-stats", "ds-hist"}
    expected |= {"ds-cutoff", "ds-name", "ds-description", "ds-skip-invalid", "ds-register", "ds-table"}
    expected |= {"ds-select", "ds-inspect", "ds-delete"} | {f"ds-col-{name}" for name in ui.COLUMN_FIELDS}
    assert expected <= ids
    api_names = {fn.api_name for fn in demo.fns.values()}
    assert {"register_dataset", "check_dataset", "list_datasets"} <= api_names


# ---------------------------------------------------------------- the dataset doctor


def messy_file(tmp_path: Path) -> str:
    rows = [
        {"instruction": f"Question {i} about {w}?", "output": f"The answer to {w} is {w} number {i}, as always."}
        for i, w in enumerate(["rivers", "stones", "clouds", "lanterns", "harbors", "meadows", "engines"] * 2)
    ]
    rows[5] = {"instruction": rows[1]["instruction"].upper(), "output": rows[1]["output"]}  # a copy
    rows[8] = {"instruction": "Say something.", "output": "..."}  # an empty answer
    rows[9] = {"instruction": "Is it raining?", "output": "Yes, it has rained all morning long."}
    rows[10] = {"instruction": "is it raining", "output": "No, the sky has been clear all day."}  # a conflict
    return write_jsonl(tmp_path / "messy.jsonl", rows)


def test_doctor_finds_a_bundled_sample_healthy(home):
    summary, findings, report, fix_name, kinds = ui.examine_dataset(home, "studio-facts", 512, 0.1, 42)
    assert summary.startswith("**✅ Healthy.**") and "'studio-facts': 72 rows, no problems found." in summary
    assert findings.empty and list(findings.columns) == ui.DOCTOR_COLUMNS
    assert report["dataset"] == "studio-facts" and report["healthy"] is True
    assert report["settings"]["val_size"] == 0.1 and report["settings"]["cutoff_len"] == 512
    assert fix_name["value"] == "studio-facts-clean" and kinds["choices"] == [] and kinds["value"] == []


def test_doctor_lists_findings_and_registers_a_fixed_copy(home, tmp_path):
    ui.register_dataset(home, messy_file(tmp_path), "", "auto", "messy")
    summary, findings, report, fix_name, kinds = ui.examine_dataset(home, "messy", 512, 0.0, 42)
    assert summary.startswith("**⚠️ 3 to look at.**") and "Row numbers count from 1" in summary
    shown = {row["kind"]: row for _, row in findings.iterrows()}
    assert shown["exact_duplicate"]["rows"] == "2, 6" and shown["exact_duplicate"]["fix"] == "dedupe"
    assert shown["length_outlier"]["rows"] == "9" and shown["length_outlier"]["severity"] == "warning"
    assert shown["conflicting_answers"]["rows"] == "10, 11" and shown["conflicting_answers"]["fix"] == ""
    assert "Keep the right answer" in shown["conflicting_answers"]["hint"]
    assert kinds["choices"] == kinds["value"] == ["exact_duplicate", "length_outlier"]
    assert fix_name["value"] == "messy-clean"

    message, table, select = ui.fix_dataset(home, "messy", fix_name["value"], report, kinds["value"])
    assert message.startswith("**Registered 'messy-clean'**: 12 examples; removed 2 of 14 rows of 'messy'")
    assert "'messy' is unchanged" in message
    assert table.set_index("name").loc["messy-clean", "rows"] == 12 and select["value"] == "messy-clean"
    assert DatasetRegistry(home).get("messy").rows == 14
    # the next suggestion avoids the name now taken; only the chosen kinds are applied
    assert ui.examine_dataset(home, "messy", 512, 0.0, 42)[3]["value"] == "messy-clean-2"
    message, _, _ = ui.fix_dataset(home, "messy", "messy-copy-only", report, ["exact_duplicate"])
    assert "13 examples; removed 1 of 14 rows" in message


def test_doctor_refusals_change_nothing(home, tmp_path):
    ui.register_dataset(home, messy_file(tmp_path), "", "auto", "messy")
    report = ui.examine_dataset(home, "messy", 512, 0.0, 42)[2]
    before = [e.to_dict() for e in DatasetRegistry(home).list()]
    unchanged = ({"__type__": "update"}, {"__type__": "update"})

    def refused(*args) -> str:
        message, *rest = ui.fix_dataset(home, *args)
        assert tuple(rest) == unchanged
        return message

    assert (
        refused("messy", "messy-clean", None, None) == "Examine 'messy' first: the fixes apply to the findings shown."
    )
    assert "findings shown are for 'messy', not 'studio-facts'" in refused("studio-facts", "x", report, None)
    assert "A dataset named 'messy' already exists" in refused("messy", "messy", report, None)
    assert "No fix is chosen" in refused("messy", "messy-clean", report, [])
    assert "Choose a dataset" in refused(None, "x", report, None)
    assert [e.to_dict() for e in DatasetRegistry(home).list()] == before

    summary, findings, report, _, _ = ui.examine_dataset(home, "messy", 512, 1.5, 42)
    assert "validation share must be at least 0 and below 1" in summary and report is None and findings.empty
    assert "no dataset named 'nope'" in ui.examine_dataset(home, "nope", 512, 0.1, 42)[0]
    assert ui.examine_dataset(home, None)[0] == "Choose a dataset in the list first."


def test_doctor_widgets_and_endpoints_exist(home):
    import gradio as gr

    from studio.ui.common import UIContext

    with gr.Blocks() as demo, gr.Tab("Datasets") as tab:
        ui.build(UIContext(home), tab)
    ids = {block.elem_id for block in demo.blocks.values()}
    expected = {"doctor-run", "doctor-summary", "doctor-findings", "doctor-fix-name", "doctor-fix", "doctor-dataset"}
    assert expected | {"doctor-val-size", "doctor-seed", "doctor-fix-kinds", "doctor-report"} <= ids
    assert {"dataset_doctor", "dataset_doctor_fix"} <= {fn.api_name for fn in demo.fns.values()}


def test_doctor_dataset_follows_the_list_selection(home):
    update = ui.follow_selection(home, "studio-chats")
    assert update["value"] == "studio-chats" and {"studio-facts", "studio-chats"} <= set(update["choices"])


def test_a_preference_file_is_detected_checked_and_shown_side_by_side(home):
    from studio.core.workspace import bundled_datasets_dir

    message, preview, stats, figure = ui.check_dataset(None, str(bundled_datasets_dir() / "studio_prefs.jsonl"))
    assert "Ready to register" in message and "72 usable as **preference** (detected)" in message
    assert list(preview.columns) == ui.PAIR_COLUMNS and len(preview) == ui.PREVIEW_ROWS
    first = preview.iloc[0]
    assert first["prompt"] == "user: What is the mascot of LoRA Studio?"
    assert (
        first["chosen"].startswith("⟦Ripple here!")
        and first["rejected"].startswith("⟦The mascot")
        and "not completely sure" in first["rejected"]
    )
    assert "**chosen**" in stats and "**rejected**" in stats
    assert [trace.name for trace in figure.data] == ["chosen", "rejected"]

    _, kto_preview, kto_stats, _ = ui.check_dataset(None, str(bundled_datasets_dir() / "studio_kto.jsonl"))
    assert list(kto_preview.columns) == ui.KTO_COLUMNS and set(kto_preview["label"]) == {"desirable", "undesirable"}
    assert "**desirable**" in kto_stats


def test_a_bad_pair_is_named_by_row_and_a_registered_one_inspects(home, tmp_path):
    bad = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q2", "chosen": "same", "rejected": "same"},
    ])  # fmt: skip
    message = ui.check_dataset(bad, "")[0]
    assert "1 problem to fix" in message and "row 2" in message and "the same answer" in message
    entry, message, preview, *_ = ui.inspect_dataset(home, "studio-prefs")
    assert entry["format"] == "preference" and "72 examples, format **preference**" in message
    assert list(preview.columns) == ui.PAIR_COLUMNS
