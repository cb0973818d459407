"""Evaluation's pure parts (metrics, selection, report file), its error messages, exact loss arithmetic on
a tiny model, and the Evaluate tab's callbacks; no training here (tests/integration/test_evaluate.py)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from studio.cli import evaluate as EC
from studio.core.presets import load_preset
from studio.core.procs import process_start_token
from studio.core.store import RunStatus
from studio.data import Example, Message, Sample
from studio.reports import evaluate as E
from studio.ui.common import UIContext

# -- metrics -------------------------------------------------------------------------------------


def test_exact_match_ignores_case_spacing_and_trailing_punctuation():
    assert E.normalize_answer("  The Purple   Otter.\n") == "the purple otter"
    assert E.normalize_answer("Ripple!?") == "ripple"
    assert E.normalize_answer("水獭。") == "水獭"
    preds = ["The purple otter.", "RIPPLE", "Port  Amsel!", "otters", "a, b"]
    refs = ["the purple otter", "Ripple.", "port amsel", "otter", "a b"]
    # inner punctuation and a different word still count as different answers
    assert E.exact_match(preds, refs) == pytest.approx(3 / 5)
    assert E.exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        E.exact_match(["a", "b"], ["a"])


def test_chrf_is_sacrebleus_corpus_score():
    from sacrebleu.metrics import CHRF

    preds = ["The ferry takes four hours.", "Port Amsel", "no idea"]
    refs = ["The ferry from Port Amsel takes four hours.", "The capital is Port Amsel.", "a tidemark"]
    assert E.chrf(preds, refs) == pytest.approx(CHRF().corpus_score(preds, [refs]).score)
    assert E.chrf(refs, refs) == pytest.approx(100.0)
    assert 0 <= E.chrf(["zzz"], ["abc"]) < 5


def test_rouge_l_by_hand_and_against_rouge_score():
    from rouge_score import rouge_scorer

    # LCS("the cat sat on the mat", "the cat on the mat") = 5 words: P = 5/5, R = 5/6, F1 = 10/11
    assert E.rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(10 / 11)
    pairs = [("Ripple, the otter!", "Ripple is an otter"), ("The ferry takes 4 hours.", "It takes four hours")]
    default = rouge_scorer.RougeScorer(["rougeL"])
    expected = sum(default.score(r, p)["rougeL"].fmeasure for p, r in pairs) / len(pairs)
    assert E.rouge_l([p for p, _ in pairs], [r for _, r in pairs]) == pytest.approx(expected)  # same on ASCII


def test_rouge_l_scores_other_scripts_that_rouge_scores_tokenizer_drops():
    from rouge_score import rouge_scorer

    text = "Выдра по имени Рябь"
    assert rouge_scorer.RougeScorer(["rougeL"]).score(text, text)["rougeL"].fmeasure == 0  # why we tokenize
    assert E.rouge_l([text], [text]) == pytest.approx(1.0)
    # CJK: each character is a word. LCS("紫色水獭", "紫色的水獭") = 4: P = 1, R = 4/5, F1 = 8/9
    assert E.words("紫色的水獭 Ripple") == ["紫", "色", "的", "水", "獭", "ripple"]
    assert E.rouge_l(["紫色水獭"], ["紫色的水獭"]) == pytest.approx(8 / 9)


def test_perplexity_is_exp_of_loss():
    assert E.perplexity(0.0) == 1.0
    assert E.perplexity(2.5) == pytest.approx(math.exp(2.5))
    assert E.perplexity(1e4) == math.inf


# -- selection and batching ----------------------------------------------------------------------


def test_spread_covers_the_whole_range():
    assert E.spread(10, 3) == [0, 3, 6]
    assert E.spread(3, 5) == [0, 1, 2]
    assert E.spread(0, 4) == []
    picked = E.spread(1000, 32)
    assert len(set(picked)) == 32 and picked[0] == 0 and picked[-1] > 950


def test_loss_batches_sort_by_length_and_respect_rows_and_budget():
    lengths = [50, 10, 30, 20, 40]
    assert E.loss_batches(lengths, vocab=1, max_rows=2) == [[1, 3], [2, 4], [0]]
    # 2 rows x 30 tokens x 10 vocab = 600 > 500: the third sample starts a new batch
    assert E.loss_batches([10, 20, 30], vocab=10, max_rows=8, budget=500) == [[0, 1], [2]]
    assert E.loss_batches([10_000], vocab=10, budget=1) == [[0]]  # one row always goes, however long


def test_stop_tokens_and_cutting_at_the_first():
    assert E.stop_token_ids([2, 7], 7) == [2, 7]
    assert E.stop_token_ids(None, 7) == [7]
    assert E.stop_token_ids(3, None) == [3]
    assert E.until_stop([5, 6, 7, 8, 7], [7]) == [5, 6]
    assert E.until_stop([5, 6], [7]) == [5, 6]


def _chat(*turns: tuple[str, str]) -> Example:
    return Example(messages=tuple(Message(role, content) for role, content in turns))


def test_generation_case_is_the_conversation_up_to_its_last_answer():
    one = E.generation_case(_chat(("system", "Be brief."), ("user", "Mascot?"), ("assistant", "Ripple.")))
    assert one.conversation == (("system", "Be brief."), ("user", "Mascot?"))
    assert (one.shown, one.reference, one.raw) == ("Mascot?", "Ripple.", None)
    multi = E.generation_case(_chat(("user", "Hi"), ("assistant", "Hello"), ("user", "Mascot?"), ("assistant", "R")))
    assert len(multi.conversation) == 3 and multi.reference == "R"
    assert multi.shown == "user: Hi\nassistant: Hello\nuser: Mascot?"
    text = E.generation_case(Example(text="one two three four five"))
    assert (text.raw, text.reference, text.conversation) == ("one two", "three four five", None)
    assert E.generation_case(Example(text="alone")) is None
    assert E.generation_case(_chat(("user", "no answer"))) is None


# -- the report file -----------------------------------------------------------------------------


def make_report(run_id: str = "r1", created_at: float = 1_700_000_000.0) -> E.EvalReport:
    return E.EvalReport(
        run_id=run_id,
        dataset=E.VALIDATION,
        samples=11,
        created_at=created_at,
        loss=E.Pair(2.5, 0.25),
        perplexity=E.Pair(math.exp(2.5), math.exp(0.25)),
        generation=E.Generation(8, 64, E.Scores(0.0, 30.0, 0.3), E.Scores(0.625, 80.0, 0.8)),
        examples=[E.EvalExample("Mascot?", "Ripple the otter.", "A cat.", "Ripple the otter.")],
    )


def test_report_file_has_exactly_the_schema_and_round_trips(tmp_path):
    report = make_report()
    path = E.write_report(report, tmp_path)
    assert path.parent == tmp_path / "eval" and path.name == "20231114T221320Z.json"
    data = json.loads(path.read_text())
    assert list(data) == [
        "run_id", "dataset", "samples", "created_at", "loss", "perplexity", "generation", "examples", "preference",
    ]  # fmt: skip
    assert data["preference"] is None  # instruction data: no pairs to rank
    assert data["loss"] == {"base": 2.5, "adapter": 0.25} and set(data["perplexity"]) == {"base", "adapter"}
    assert list(data["generation"]) == ["prompts", "max_new_tokens", "base", "adapter"]
    assert list(data["generation"]["adapter"]) == ["exact_match", "chrf", "rouge_l"]
    assert data["examples"] == [
        {"prompt": "Mascot?", "reference": "Ripple the otter.", "base": "A cat.", "adapter": "Ripple the otter."}
    ]
    assert json.loads((tmp_path / "eval" / "latest.json").read_text()) == data
    assert E.EvalReport.from_dict(data) == report
    assert E.load_latest(tmp_path) == report
    again = E.write_report(make_report(run_id="r1-again"), tmp_path)  # same second: both kept
    assert again.name == "20231114T221320Z-2.json" and path.is_file()
    assert E.load_latest(tmp_path).run_id == "r1-again"
    assert not [p for p in (tmp_path / "eval").iterdir() if p.name.endswith(".tmp")]


def test_a_preference_report_round_trips_and_adds_its_rows_to_the_summary(tmp_path):
    report = make_report()
    report.preference = E.PreferenceScores(14, E.Pair(0.5, 0.93), E.Pair(-1.2, 30.5))
    again = E.EvalReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report
    rows = {r["metric"]: r for r in E.summary_table(report)}
    assert rows["preference accuracy (0-1)"]["change"] == 0.43 and rows["preference margin (nats)"]["adapter"] == 30.5
    from studio.reports.card import evaluation_section

    section = evaluation_section(report.to_dict())
    assert "| preference accuracy ↑ | 0.5000 | 0.9300 | +0.43 (better) |" in section


def test_load_latest_none_when_never_evaluated_and_clear_when_damaged(tmp_path):
    assert E.load_latest(tmp_path) is None
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "latest.json").write_text("{not json")
    with pytest.raises(E.EvalError, match=r"damaged.*Evaluate the run again"):
        E.load_latest(tmp_path)
    (tmp_path / "eval" / "latest.json").write_text('{"run_id": "x"}')
    with pytest.raises(E.EvalError, match="Not an evaluation report"):
        E.load_latest(tmp_path)


def test_summary_table_rows_and_text():
    rows = E.summary_table(make_report())
    names = ["loss", "perplexity", "exact match (0-1)", "chrF (0-100)", "ROUGE-L F1 (0-1)"]
    assert [r["metric"] for r in rows] == names
    assert rows[0] == {"metric": "loss", "base": 2.5, "adapter": 0.25, "change": -2.25}
    assert rows[3]["change"] == 50.0
    text = EC.format_report(make_report())
    assert "on validation split: 11 samples for loss, 8 prompts" in text
    assert "loss" in text and "-2.2500" in text and "adapter:   Ripple the otter." in text


# -- the spec and the errors that need no model ---------------------------------------------------


def test_spec_rejects_bad_numbers_and_reads_validation_split_as_none():
    assert E.EvalSpec("r", dataset="validation split").dataset is None
    assert E.EvalSpec("r", dataset="").dataset is None
    with pytest.raises(E.EvalError, match=r"max_samples must be a whole number in 1\.\.100000 \(got 0\)"):
        E.EvalSpec("r", max_samples=0)
    with pytest.raises(E.EvalError, match=r"gen_samples.*max_new_tokens"):
        E.EvalSpec("r", gen_samples=-1, max_new_tokens=10**6)
    with pytest.raises(E.EvalError, match="Pick a run"):
        E.EvalSpec("")


@pytest.fixture
def ctx(home, monkeypatch) -> UIContext:
    monkeypatch.setenv("STUDIO_SLOTS", "0")  # submit queues, no worker starts
    return UIContext(home)


def finished_run(ctx: UIContext, val_size: float = 0.2, adapter: bool = True, status=RunStatus.COMPLETED) -> str:
    """A run row moved to `status`, with a stand-in adapter folder (check_spec looks at files only)."""
    cfg = load_preset("quick-demo")
    cfg.data.val_size = val_size
    run = ctx.jobs.submit(cfg)
    store = ctx.jobs.store
    if status == RunStatus.QUEUED:
        return run.id
    store.transition(run.id, RunStatus.RUNNING, pid=os.getpid(), pid_started=process_start_token(os.getpid()))
    adapter_dir = None
    if adapter:
        adapter_dir = Path(run.run_dir) / "adapter"
        adapter_dir.mkdir()
        (adapter_dir / "adapter_config.json").write_text("{}")
        (adapter_dir / "adapter_model.safetensors").write_bytes(b"")
    store.transition(run.id, status, adapter_dir=str(adapter_dir) if adapter_dir else None)
    return run.id


def test_errors_say_how_to_fix(ctx):
    with pytest.raises(E.EvalError, match=r"No run 'nope'. List runs with `studio runs`"):
        E.check_spec(E.EvalSpec("nope"), ctx.home)
    queued = finished_run(ctx, status=RunStatus.QUEUED)
    with pytest.raises(E.EvalError, match=r"is queued: evaluation needs a completed run.*Wait for it to finish"):
        E.check_spec(E.EvalSpec(queued), ctx.home)
    aborted = finished_run(ctx, adapter=False, status=RunStatus.ABORTED)
    with pytest.raises(E.EvalError, match=r"is aborted.*Resume it"):
        E.check_spec(E.EvalSpec(aborted), ctx.home)
    no_val = finished_run(ctx, val_size=0.0)
    with pytest.raises(E.EvalError, match=r"without a validation split.*--dataset NAME.*data\.val_size > 0"):
        E.check_spec(E.EvalSpec(no_val), ctx.home)
    assert E.check_spec(E.EvalSpec(no_val, dataset="studio-chats"), ctx.home).dataset == "studio-chats"
    with pytest.raises(E.EvalError, match=r"no registered dataset 'nothing-here'. Registered: .*studio-facts"):
        E.check_spec(E.EvalSpec(no_val, dataset="nothing-here"), ctx.home)
    good = finished_run(ctx)
    target = E.check_spec(E.EvalSpec(good), ctx.home)
    assert target.dataset == E.VALIDATION and target.config.data.val_size == 0.2
    os.remove(target.adapter_dir / "adapter_model.safetensors")
    with pytest.raises(E.EvalError, match=r"has no adapter at .*Train it again"):
        E.check_spec(E.EvalSpec(good), ctx.home)


def test_cli_parser_and_an_error_exit(ctx, capsys):
    import argparse

    parser = EC.add_arguments(argparse.ArgumentParser(prog="studio eval"))
    args = parser.parse_args(["RUN", "--dataset", "studio-chats", "--samples", "5", "--gen-samples", "2", "--json"])
    spec = EC.spec_from_args(args)
    assert (spec.run_id, spec.dataset, spec.max_samples, spec.gen_samples, spec.max_new_tokens) == (
        "RUN", "studio-chats", 5, 2, 64,
    )  # fmt: skip
    assert args.json and not parser.parse_args(["RUN"]).json and parser.parse_args(["RUN"]).dataset is None
    assert EC.run_cli(parser.parse_args(["missing-run"]), ctx.home) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: No run 'missing-run'. List runs with `studio runs`."
    assert EC.run_cli(parser.parse_args(["missing-run", "--samples", "0"]), ctx.home) == 2
    assert "max_samples must be" in capsys.readouterr().err
    assert E.child_command(spec)[1:] == [
        "-m", "studio.cli", "eval", "RUN", "--json", "--samples", "5", "--gen-samples", "2",
        "--max-new-tokens", "64", "--dataset", "studio-chats",
    ]  # fmt: skip


def test_child_outcome_reads_the_report_or_the_reason():
    report = make_report()
    ok = E.child_outcome(11, 0, json.dumps(report.to_dict()), [])
    assert ok.report == report and ok.error is None and ok.pid == 11
    bad = E.child_outcome(11, 2, "", ["[eval] Loading", "error: Run x is queued: wait."])
    assert bad.report is None and bad.error == "Run x is queued: wait."
    killed = E.child_outcome(11, -9, "", ["[eval] Generating 8 answers", ""])
    assert "killed by SIGKILL" in killed.error and "Generating 8 answers" in killed.error
    garbled = E.child_outcome(11, 0, "Loading weights...", [])
    assert garbled.report is None and "no readable report" in garbled.error


def test_the_child_reports_an_error_and_is_gone(ctx, eval_child_pids):
    from tests.conftest import kill_tree

    pids = eval_child_pids
    try:
        outcome = E.evaluate_in_child(E.EvalSpec("no-such-run"), ctx.home, timeout_s=120)
        assert outcome.returncode == 2 and outcome.report is None
        assert outcome.error == "No run 'no-such-run'. List runs with `studio runs`."
        assert pids == [outcome.pid] and not Path(f"/proc/{outcome.pid}").exists()  # ended and reaped
        late = E.evaluate_in_child(E.EvalSpec("no-such-run"), ctx.home, timeout_s=0.05)
        assert late.returncode is None and "took longer than 0.05 s and was stopped" in late.error
        assert not Path(f"/proc/{late.pid}").exists()
    finally:
        for pid in pids:
            kill_tree(pid)


# -- exact loss and batched generation on a tiny model -------------------------------------------


@pytest.fixture(scope="module")
def tiny_lora(tiny_model_dir):
    """A tiny Llama with a random (non-zero) LoRA, so base and adapter really differ."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _samples() -> list[Sample]:
    ids = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]
    labels = [[-100, -100, -100, 8, 9, 10, 11], [-100, 21, 22], [-100, -100, 32, -100, 34]]
    return [Sample(i, lab, False, len(i)) for i, lab in zip(ids, labels, strict=True)]


def test_padded_batch_loss_equals_the_models_own_loss_sample_by_sample(tiny_lora):
    import torch

    model, tok = tiny_lora
    samples = _samples()
    total, count = E.summed_loss(model, samples, tok.pad_token_id, "cpu")
    assert count == 4 + 2 + 2  # the first position has no prediction; masked labels never count
    expected_sum = 0.0
    with torch.no_grad():
        for s in samples:  # one at a time, unpadded: HF's mean over the shifted trained tokens
            loss = model(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels])).loss
            expected_sum += float(loss) * (s.trained_tokens - (s.labels[0] != -100))
    assert total == pytest.approx(expected_sum, rel=1e-5)

    pair = E.mean_losses(model, samples, tok.pad_token_id, "cpu")
    assert pair.adapter == pytest.approx(total / count, rel=1e-5)
    with model.disable_adapter():
        base_total, _ = E.summed_loss(model, samples, tok.pad_token_id, "cpu")
    assert pair.base == pytest.approx(base_total / count, rel=1e-5) and pair.base != pytest.approx(pair.adapter)


def test_batched_greedy_answers_equal_one_by_one(tiny_lora):
    model, tok = tiny_lora
    prompts = [
        E.prompt_ids(tok, E.generation_case(_chat(("user", q), ("assistant", "x"))), 64)
        for q in ("Hello there", "What is the mascot of LoRA Studio, and why?", "Hi")
    ]
    assert prompts[0][-3:] == tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]
    answers = {}
    for use_adapter in (False, True):
        batched = E.generate_ids(model, tok, prompts, 12, "cpu", use_adapter)
        single = [E.generate_ids(model, tok, [p], 12, "cpu", use_adapter)[0] for p in prompts]
        assert batched == single and all(len(a) == 12 for a in batched)  # left padding changes nothing
        answers[use_adapter] = batched
    assert answers[False] != answers[True]


# -- the Evaluate tab ----------------------------------------------------------------------------


def test_tab_lists_runs_datasets_and_shows_the_latest_report(ctx):
    from studio.ui import evaluate as U

    run_id = finished_run(ctx)
    no_val = finished_run(ctx, val_size=0.0)
    finished_run(ctx, adapter=False, status=RunStatus.FAILED)
    assert {value for _, value in U.evaluable_runs(ctx)} == {run_id, no_val}
    assert U.dataset_choices(ctx)[0] == E.VALIDATION and "studio-facts" in U.dataset_choices(ctx)

    message, table, examples = U.show_latest(ctx, run_id)
    assert "has not been evaluated yet" in message and table.empty and list(table.columns) == U.TABLE_COLUMNS
    assert "without a validation split" in U.show_latest(ctx, no_val)[0]
    E.write_report(make_report(run_id=run_id), ctx.jobs.run_dir(run_id))
    message, table, examples = U.show_latest(ctx, run_id)
    assert "Latest evaluation" in message and table.iloc[0]["metric"] == "loss"
    assert table.iloc[0]["change"] == -2.25 and list(examples.columns) == U.EXAMPLE_COLUMNS
    assert examples.iloc[0]["adapter"] == "Ripple the otter."
    assert U.latest_report_dict(ctx, run_id)["loss"] == {"base": 2.5, "adapter": 0.25}
    assert U.latest_report_dict(ctx, no_val) == {}
    assert "Pick a completed run" in U.show_latest(ctx, None)[0]


def test_tab_refuses_bad_input_at_once_without_a_process(ctx, monkeypatch):
    from studio.ui import evaluate as U

    monkeypatch.setattr(E.procs, "spawn", lambda *a, **k: pytest.fail("no child process for bad input"))
    no_val = finished_run(ctx, val_size=0.0)
    assert list(U.run_evaluation(ctx, None, E.VALIDATION, 32, 8, 64)) == [
        ("**Error:** Pick a completed run to evaluate.", None, None)
    ]
    ((message, _, _),) = U.run_evaluation(ctx, no_val, E.VALIDATION, 32, 8, 64)
    assert message.startswith("**Error:**") and "without a validation split" in message
    ((message, _, _),) = U.run_evaluation(ctx, no_val, "studio-facts", 2.5, 8, 64)
    assert "whole number for samples" in message
    ((message, _, _),) = U.run_evaluation(ctx, no_val, "studio-facts", None, 8, 64)
    assert "whole number for samples" in message


def test_tab_builds_with_its_ids_and_endpoints(ctx):
    import gradio as gr

    from studio.ui import evaluate as U

    with gr.Blocks() as app, gr.Tab("Evaluate") as tab:
        U.build(ctx, tab)
    ids = {b.elem_id for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert {"eval-run", "eval-dataset", "eval-start", "eval-status", "eval-table", "eval-examples"} <= ids
    names = {fn.api_name for fn in app.fns.values() if fn.api_name}
    assert {"evaluate_run", "eval_report"} <= names
