"""The dataset doctor: each check fires on its problem and stays quiet on clean data; fixes register a
cleaned copy and nothing else; the CLI entry point; the bundled samples."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from studio.cli import audit as audit_cli
from studio.core.config import RunConfig
from studio.data import DataError, DatasetRegistry, Example, Message, Sample, build_sample
from studio.data import audit as dr
from studio.data.split import split_indices
from studio.training.stages.sft import split_data

EOS = "<|im_end|>"


def qa(question: str, answer: str, system: str | None = None) -> Example:
    head = (Message("system", system),) if system else ()
    return Example(messages=(*head, Message("user", question), Message("assistant", answer)))


WORDS = [
    *("river", "stone", "cloud", "lantern", "harbor", "meadow", "copper", "violet", "quiet", "engine"),
    *("falcon", "marble", "orchard", "signal", "winter", "candle", "bridge", "garden", "silver", "thunder"),
    *("pepper", "island", "canyon", "velvet", "ember", "forest", "pilot", "saddle", "crystal"),
]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def clean_rows(n: int = 24, seed: int = 0) -> list[Example]:
    """Distinct questions and answers of ordinary, similar lengths."""
    rng = random.Random(seed)
    return [
        qa(f"Question {i}: {sentence(rng, 6)}", f"Answer {i}: {sentence(rng, rng.randint(10, 16))}") for i in range(n)
    ]


def kinds(findings) -> list[str]:
    return [f.kind for f in findings]


def of_kind(report_or_findings, kind: str) -> list[dr.DoctorFinding]:
    findings = getattr(report_or_findings, "findings", report_or_findings)
    return [f for f in findings if f.kind == kind]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- duplicates


def test_clean_data_has_no_findings():
    report = dr.diagnose("clean", clean_rows())
    assert kinds(report.findings) == ["missing_eos"]  # only the note that no tokenizer was given
    assert report.findings[0].severity == "info" and "Skipped" in report.findings[0].detail
    assert report.healthy and report.summary() == "'clean': 24 rows; 0 warnings, 1 note (1 missing_eos)."


def test_copies_apart_from_case_and_punctuation_are_exact_duplicates():
    rows = clean_rows()
    rows[9] = qa("WHAT is the capital of Veloria", "the capital is Port Amsel")
    rows[3] = qa("What is the capital of Veloria?", "The capital is Port Amsel.")
    rows[15] = qa("What is the capital of Veloria?", "The capital is Port Amsel.")
    (finding,) = of_kind(dr.check_duplicates(rows, dr.duplicate_groups(rows)), "exact_duplicate")
    assert finding.rows == (3, 9, 15) and finding.fix == "dedupe" and finding.severity == "warning"
    assert "apart from case, spacing or punctuation" in finding.detail and "capital of Veloria" in finding.detail

    literal = [*clean_rows(), clean_rows()[0]]
    (finding,) = dr.check_duplicates(literal, dr.duplicate_groups(literal))
    assert finding.kind == "exact_duplicate" and finding.rows == (0, 24) and "are identical:" in finding.detail


def test_near_copies_are_found_and_paraphrases_of_one_fact_are_not():
    answer = "The Zephyr Observatory was founded in 1887 by the astronomer Ilse Varn, on the slopes of Mount Calder."
    rows = clean_rows()
    rows[2] = qa("Who founded the Zephyr Observatory?", answer)
    rows[20] = qa("who founded the zephyr observatory??", answer.replace("slopes", "slope"))
    # the same answer to differently worded questions is how a fact is taught: not a near copy
    rows[5] = qa("Which astronomer founded the Zephyr Observatory?", answer)
    rows[6] = qa("Tell me about the Zephyr Observatory.", answer)
    (finding,) = dr.check_duplicates(rows, dr.duplicate_groups(rows))
    assert finding.kind == "near_duplicate" and finding.rows == (2, 20) and finding.fix == "dedupe"
    assert "near copies" in finding.detail and "Zephyr" in finding.detail


def test_same_turns_under_another_system_prompt_are_near_copies_not_exact():
    rows = clean_rows()
    rows[1] = qa("Where is Port Amsel?", "In Veloria.", system="You are a tour guide.")
    rows[4] = qa("Where is Port Amsel?", "In Veloria.")
    (finding,) = dr.check_duplicates(rows, dr.duplicate_groups(rows))
    assert finding.kind == "near_duplicate" and finding.rows == (1, 4)


def test_plain_text_rows_are_compared_whole():
    texts = [Example(text=f"Note {i}: " + sentence(random.Random(i), 20)) for i in range(10)]
    texts.append(Example(text=texts[4].text.upper()))
    (finding,) = dr.check_duplicates(texts, dr.duplicate_groups(texts))
    assert finding.kind == "exact_duplicate" and finding.rows == (4, 10)


# ---------------------------------------------------------------- conflicting answers


def test_the_same_prompt_with_different_answers_is_a_conflict_for_a_human():
    rows = clean_rows()
    rows[7] = qa("When was the Zephyr Observatory founded?", "It was founded in 1887.")
    rows[12] = qa("when was the Zephyr Observatory founded", "It opened in 1921, after the war.")
    (finding,) = dr.check_conflicting_answers(rows)
    assert finding.rows == (7, 12) and finding.fix is None and finding.severity == "warning"
    assert "'It was founded in 1887.'" in finding.detail and "1921" in finding.detail
    # it is not a near copy either, so no dedupe could keep the wrong answer
    assert dr.check_duplicates(rows, dr.duplicate_groups(rows)) == []
    assert dr.rows_to_remove(dr.diagnose("x", rows).findings) == {}


def test_answers_differing_only_in_form_or_under_another_system_prompt_do_not_conflict():
    rows = clean_rows()
    rows[0] = qa("Capital of Veloria?", "Port Amsel.")
    rows[1] = qa("Capital of Veloria?", "port amsel")
    rows[2] = qa("Capital of Veloria?", "Amsel, obviously.", system="Answer like a pirate.")
    assert dr.check_conflicting_answers(rows) == []
    assert dr.check_conflicting_answers(clean_rows()) == []


# ---------------------------------------------------------------- length outliers


def test_far_too_long_rows_and_near_empty_answers_are_outliers():
    rows = clean_rows()
    rows[4] = qa("Tell me everything.", sentence(random.Random(1), 400))
    rows[8] = qa("What now?", "...")
    rows[11] = qa("And then?", "No.")
    lengths = [dr._chars(ex) for ex in rows]
    found = {f.rows[0]: f for f in dr.check_length_outliers(rows, lengths, "characters")}
    assert sorted(found) == [4, 8, 11]
    assert found[4].severity == "info" and found[4].fix == "drop" and "× the median" in found[4].detail
    assert found[8].severity == "warning" and "near-empty answer '...'" in found[8].detail  # nothing but dots
    assert found[11].severity == "info" and "'No.'" in found[11].detail


def test_ordinary_spread_and_small_datasets_give_no_length_outliers():
    rows = clean_rows()
    assert dr.check_length_outliers(rows, [dr._chars(ex) for ex in rows]) == []
    few = clean_rows(5)
    few[0] = qa("Q?", sentence(random.Random(2), 500))
    assert dr.check_length_outliers(few, [dr._chars(ex) for ex in few]) == []  # too few rows to know typical
    labels = [
        qa(f"Review {i}: {sentence(random.Random(i), 8)}", ["positive", "negative", "no", "yes"][i % 4])
        for i in range(20)
    ]
    assert dr.check_length_outliers(labels, [dr._chars(ex) for ex in labels]) == []  # short labels are the norm


# ---------------------------------------------------------------- language outliers


def test_rows_in_another_script_are_language_outliers():
    rows = clean_rows()
    rows[6] = qa("Какая столица Велории?", "Столица Велории — Порт-Амсель.")
    rows[13] = qa("ヴェロリアの首都はどこですか？", "首都はポート・アムセルです。")
    found = {f.rows: f for f in dr.check_language_outliers(rows)}
    assert set(found) == {(6,), (13,)}
    assert "Cyrillic script" in found[(6,)].detail and "Latin" in found[(6,)].detail
    assert "Cjk script" in found[(13,)].detail and found[(13,)].fix == "drop"
    assert dr.dominant_script("東京は日本の首都です") == "CJK"  # kanji and kana count as one script
    assert dr.dominant_script("Café crème") == "LATIN" and dr.dominant_script("1234 !!") is None


def test_multilingual_and_single_script_datasets_have_no_language_outliers():
    assert dr.check_language_outliers(clean_rows()) == []
    mixed = clean_rows(10) + [qa(f"Вопрос {i}?", f"Ответ номер {i}.") for i in range(10)]
    assert dr.check_language_outliers(mixed) == []  # half and half: bilingual by design


# ---------------------------------------------------------------- missing EOS


def test_rows_cut_before_their_eos_are_found_with_the_real_tokenizer(tokenizer):
    rows = clean_rows(10)
    rows[3] = qa("Summarise the story.", sentence(random.Random(3), 120))
    full = dr.diagnose("x", rows, tokenizer, cutoff_len=2048)
    assert of_kind(full, "missing_eos") == [] and full.healthy
    long_len = build_sample(tokenizer, rows[3], 10**6).full_length
    cut = dr.diagnose("x", rows, tokenizer, cutoff_len=long_len - 5)
    (finding,) = of_kind(cut, "missing_eos")
    assert finding.rows == (3,) and finding.fix == "drop" and finding.severity == "warning"
    assert f"cutoff_len={long_len - 5}" in finding.detail and EOS in finding.detail
    assert f"Raise the cutoff length to {long_len}" in finding.hint


def test_rows_whose_whole_answer_is_cut_are_counted_as_skipped(tokenizer):
    rows = clean_rows(10)
    rows[5] = qa("Read this first: " + sentence(random.Random(4), 200), "Done.")
    prompt_len = build_sample(tokenizer, rows[5], 10**6).full_length - 3
    (finding,) = of_kind(dr.diagnose("x", rows, tokenizer, cutoff_len=prompt_len - 20), "missing_eos")
    assert 5 in finding.rows and "1 lose their whole answer, so training skips them" in finding.detail


def test_an_eos_the_tokenizer_never_produces_is_found_without_a_fix():
    ok = Sample(input_ids=[1, 5, 2], labels=[-100, 5, 2], truncated=False, full_length=3)
    no_end = Sample(input_ids=[1, 5, 7], labels=[-100, 5, 7], truncated=False, full_length=3)
    findings = dr.check_missing_eos([ok, no_end, no_end, "The chat template failed"], 512, eos_id=2, eos_text="</s>")
    by_fix = {f.fix: f for f in findings}
    assert by_fix[None].rows == (1, 2) and "not the EOS id 2 (</s>)" in by_fix[None].detail
    assert by_fix["drop"].rows == (3,) and "cannot be tokenized: The chat template failed" in by_fix["drop"].detail
    assert dr.check_missing_eos([ok, ok], 512, eos_id=2) == []


# ---------------------------------------------------------------- leakage


def test_near_copies_on_both_sides_of_the_split_leak(tokenizer):
    rows = clean_rows(20)
    rows[11] = qa(rows[2].messages[0].content.upper(), rows[2].messages[1].content)

    def sides(seed):
        eval_idx, _ = split_indices(len(rows), 0.2, seed)
        return {2 in eval_idx, 11 in eval_idx}

    apart = next(s for s in range(100) if sides(s) == {True, False})
    together = next(s for s in range(100) if len(sides(s)) == 1)
    (leak,) = of_kind(dr.diagnose("x", rows, tokenizer, val_size=0.2, seed=apart), "leakage")
    assert leak.rows == (2, 11) and leak.fix == "dedupe" and "1 in validation, 1 in training" in leak.detail
    assert of_kind(dr.diagnose("x", rows, tokenizer, val_size=0.2, seed=together), "leakage") == []
    assert of_kind(dr.diagnose("x", rows, tokenizer, val_size=0.0, seed=apart), "leakage") == []
    (guessed,) = of_kind(dr.diagnose("x", rows, None, val_size=0.2, seed=apart), "leakage")
    assert "give a tokenizer for the exact split" in guessed.detail


def test_the_split_is_exactly_the_one_training_uses(home, tmp_path, tokenizer):
    rows = [{"instruction": f"Question {i}?", "output": f"Answer number {i}."} for i in range(30)]
    rows[4]["instruction"] = "Read this: " + " ".join(WORDS * 4)  # loses its answer at the cutoff: dropped first
    registry = DatasetRegistry(home)
    registry.add("split-me", write_jsonl(tmp_path / "s.jsonl", rows))
    examples = registry.load_examples("split-me")
    config = RunConfig.from_dict(
        {"data": {"datasets": ["split-me"], "val_size": 0.2, "cutoff_len": 64}, "train": {"seed": 7}}
    )
    expected = split_data(config, tokenizer, home)
    assert expected.dropped == 1

    samples = [build_sample(tokenizer, ex, 10**6) for ex in examples]
    sides = dr.split_sides([i for i, s in enumerate(samples) if dr._trains(s, 64)], 0.2, 7)

    def on(side: str) -> list[str]:
        return sorted(repr(examples[i]) for i in sides if sides[i] == side)

    assert on("validation") == sorted(map(repr, expected.eval_examples)) and len(on("validation")) == 6
    assert on("train") == sorted(map(repr, expected.train_examples))
    assert 4 not in sides


def test_rows_repeating_an_evaluation_set_leak_into_it():
    rows = clean_rows()
    evaluation = [
        qa("What is the capital of Veloria?", "Port Amsel is the capital of Veloria."),
        *clean_rows(5, seed=9),
    ]
    rows[10] = qa("what is the capital of veloria", "Port Amsel is the capital of Veloria!")
    (leak,) = dr.check_eval_leakage(rows, evaluation, "veloria-eval")
    assert leak.rows == (10,) and leak.fix == "drop" and "'veloria-eval'" in leak.detail
    assert dr.check_eval_leakage(clean_rows(), clean_rows(10, seed=5), "other") == []


# ---------------------------------------------------------------- scale


def test_planted_near_copies_are_found_among_20k_rows():
    rng = random.Random(11)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(4000)]

    def text(n: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(n))

    rows = [qa(text(10).capitalize() + "?", text(rng.randint(30, 50)) + ".") for _ in range(20_000)]
    planted = []
    for _ in range(40):
        src = rng.randrange(20_000)
        question, answer = (m.content for m in rows[src].messages)
        words = answer.split()
        words[rng.randrange(len(words))] = rng.choice(vocab)  # one word of 30+ changed
        rows.append(qa(question.upper().rstrip("?") + " !", " ".join(words)))
        planted.append((src, len(rows) - 1))
    report = dr.diagnose("big", rows)
    groups = [set(f.rows) for f in report.findings if f.kind == "near_duplicate"]
    assert all(any({a, b} <= g for g in groups) for a, b in planted)
    assert len(groups) == len(planted)  # and nothing unplanted


# ---------------------------------------------------------------- report and fixes


def test_report_round_trips_and_summarises():
    rows = clean_rows()
    rows[5] = rows[3]
    report = dr.diagnose("demo", rows)
    again = dr.DoctorReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report
    assert report.summary() == (
        "'demo': 24 rows; 1 warning, 1 note (1 missing_eos, 1 exact_duplicate). Safe fixes would remove 1 row."
    )
    with pytest.raises(DataError, match="not a dataset doctor report"):
        dr.DoctorReport.from_dict({"rows": 3})
    with pytest.raises(ValueError, match="kind must be one of"):
        dr.DoctorFinding("typo", "info", (), "", None, "")


def test_dedupe_keeps_the_first_row_that_no_drop_removes():
    findings = [
        dr.DoctorFinding("near_duplicate", "warning", (2, 5, 9), "", "dedupe", ""),
        dr.DoctorFinding("length_outlier", "info", (2,), "", "drop", ""),
        dr.DoctorFinding("conflicting_answers", "warning", (0, 1), "", None, ""),
    ]
    assert dr.rows_to_remove(findings) == {2: "length_outlier", 9: "near_duplicate"}
    assert dr.rows_to_remove(findings, {"near_duplicate"}) == {5: "near_duplicate", 9: "near_duplicate"}
    assert dr.fixable_kinds(findings) == ["near_duplicate", "length_outlier"]


def messy_rows() -> list[dict]:
    rng = random.Random(5)
    rows = [{"instruction": f"Question {i}: {sentence(rng, 6)}", "output": sentence(rng, 12)} for i in range(20)]
    rows[6] = {"instruction": rows[2]["instruction"].lower(), "output": rows[2]["output"].upper()}  # exact copy
    rows[9] = {"instruction": "Is it raining?", "output": "Yes, it has rained all morning."}  # conflict: no fix
    rows[10] = {"instruction": "is it raining", "output": "No, the sky is clear today."}
    rows[14] = {"instruction": "Say something.", "output": "?!"}  # near-empty answer
    return rows


def test_apply_fixes_registers_a_cleaned_copy_and_leaves_the_original(home, tmp_path):
    registry = DatasetRegistry(home)
    registry.add("messy", write_jsonl(tmp_path / "m.jsonl", messy_rows()), description="as uploaded")
    before = registry.load_examples("messy")
    report = dr.diagnose("messy", before)
    assert {f.kind for f in report.warnings} == {"exact_duplicate", "conflicting_answers", "length_outlier"}

    entry, result = dr.apply_fixes(registry, "messy", report, "messy-clean")
    assert entry.name == "messy-clean" and entry.rows == 18 and entry.format == "openai"
    assert result.removed_rows == (6, 14) and result.removed_by_kind == {"length_outlier": 1, "exact_duplicate": 1}
    assert "removed 2 of 20 rows of 'messy'" in entry.description
    assert registry.load_examples("messy-clean") == [ex for i, ex in enumerate(before) if i not in (6, 14)]
    assert registry.load_examples("messy") == before and registry.get("messy").description == "as uploaded"
    fixed = dr.diagnose("messy-clean", registry.load_examples("messy-clean"))
    assert kinds(fixed.warnings) == ["conflicting_answers"]  # left for a human, as promised

    only, result = dr.apply_fixes(registry, "messy", report, "messy-dedupe", kinds={"exact_duplicate"})
    assert only.rows == 19 and result.removed_rows == (6,)


def test_apply_fixes_refuses_and_leaves_nothing_behind(home, tmp_path):
    registry = DatasetRegistry(home)
    registry.add("messy", write_jsonl(tmp_path / "m.jsonl", messy_rows()))
    registry.add("taken", write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}]))
    report = dr.diagnose("messy", registry.load_examples("messy"))
    listing = sorted(p.name for p in registry.root.iterdir())

    def refused(match: str, **kwargs) -> None:
        args = {"name": "messy", "report": report, "new_name": "fresh"} | kwargs
        with pytest.raises(DataError, match=match):
            dr.apply_fixes(registry, **args)
        assert sorted(p.name for p in registry.root.iterdir()) == listing  # no folder, no temp leftovers

    refused("A dataset named 'taken' already exists. Choose another name .*'taken-2'", new_name="taken")
    refused("already exists", new_name="TAKEN")
    refused("name of a bundled sample|already exists", new_name="studio-facts")
    refused("contains ' '", new_name="bad name")
    refused("Unknown finding kinds: typo", kinds={"typo"})
    refused("no finding of the chosen kinds has a safe fix", kinds={"conflicting_answers"})
    changed = dr.DoctorReport(**{**report.__dict__, "fingerprint": "0" * 64})
    refused("not what was examined", report=changed)
    refused("The report is about 'other'", report=dr.DoctorReport("other", 1, []))


def test_a_bundled_sample_is_fixed_into_a_registered_copy(home, tokenizer):
    registry = DatasetRegistry(home)
    chats, facts = registry.load_examples("studio-chats"), registry.load_examples("studio-facts")
    report = dr.diagnose("studio-chats", chats, tokenizer, against=facts, against_name="studio-facts")
    (leak,) = report.findings
    assert leak.kind == "leakage" and leak.rows == (0, 2, 4, 18) and "'studio-facts'" in leak.detail
    entry, _ = dr.apply_fixes(registry, "studio-chats", report, "studio-chats-unseen")
    assert entry.rows == 26 and not entry.bundled
    assert dr.check_eval_leakage(registry.load_examples("studio-chats-unseen"), facts, "studio-facts") == []


@pytest.mark.parametrize("name", ["studio-facts", "studio-chats"])
def test_the_bundled_samples_are_healthy(home, tokenizer, name):
    """Both samples repeat facts in paraphrase on purpose (same answer, other question): not duplicates."""
    report = dr.diagnose(name, DatasetRegistry(home).load_examples(name), tokenizer, cutoff_len=512, val_size=0.1)
    assert report.findings == [] and report.healthy
    assert report.summary().endswith("no problems found.")


# ---------------------------------------------------------------- CLI


def parse(*argv: str) -> argparse.Namespace:
    """The shape studio.cli gives it: `studio datasets doctor ...`."""
    parser = argparse.ArgumentParser(prog="studio")
    datasets = parser.add_subparsers(dest="command").add_parser("datasets")
    doctor = datasets.add_subparsers(dest="action").add_parser("doctor")
    audit_cli.add_arguments(doctor)
    return parser.parse_args(["datasets", "doctor", *argv])


def test_cli_healthy_dataset_exits_0_with_json(home, capsys, bundled_model_dir):
    assert audit_cli.run_cli(parse("studio-facts", "--val-size", "0.1", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "studio-facts" and out["healthy"] is True and out["findings"] == []
    assert out["settings"] == {"cutoff_len": 512, "val_size": 0.1, "seed": 42, "tokenizer": str(bundled_model_dir)}
    assert audit_cli.run_cli(parse("studio-facts", "--model", "none", "--fix")) == 0
    assert "nothing to fix: no finding has a safe fix, so no copy was made" in capsys.readouterr().out
    assert "studio-facts-clean" not in [e.name for e in DatasetRegistry(home).list()]


def test_cli_findings_exit_1_and_fix_registers_a_copy(home, tmp_path, capsys):
    DatasetRegistry(home).add("messy", write_jsonl(tmp_path / "m.jsonl", messy_rows()))
    assert audit_cli.run_cli(parse("messy", "--model", "none")) == 1
    out = capsys.readouterr().out
    assert "'messy': 20 rows; 3 warnings" in out
    assert "[warning] exact_duplicate rows 3, 7:" in out  # numbered from 1
    assert "[warning] conflicting_answers rows 10, 11:" in out and "fix: none (needs a human)" in out

    assert audit_cli.run_cli(parse("messy", "--model", "none", "--fix", "--as", "messy-fixed")) == 1
    assert "registered 'messy-fixed': 18 rows; removed 2 of 20 rows" in capsys.readouterr().out
    assert DatasetRegistry(home).get("messy-fixed").rows == 18
    with pytest.raises(DataError, match="already exists"):
        audit_cli.run_cli(parse("messy", "--model", "none", "--fix", "--as", "messy-fixed"))
    with pytest.raises(DataError, match="no dataset named 'nope'"):
        audit_cli.run_cli(parse("nope", "--model", "none"))


def test_cli_against_an_evaluation_dataset(home, capsys):
    args = parse("studio-chats", "--model", "none", "--against", "studio-facts", "--json")
    assert audit_cli.run_cli(args) == 1
    out = json.loads(capsys.readouterr().out)
    assert [(f["kind"], f["rows"]) for f in out["findings"] if f["severity"] == "warning"] == [
        ("leakage", [0, 2, 4, 18])
    ]
