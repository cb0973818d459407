"""Evaluation of a real run: the bundled model trained briefly on studio-facts with a validation split
(through `studio train`, the real worker), then scored on that split, on another registered dataset,
from the command line and through the Evaluate tab's child process; each time checked on what came out."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from studio.cli import evaluate as EC
from studio.core.store import RunStatus, Store
from studio.reports import evaluate as E
from studio.ui.common import UIContext
from tests.conftest import kill_tree

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = 20  # enough for the facts to show on held-out paraphrases (loss ~0.4 at step 20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = dict(os.environ, STUDIO_HOME=str(home), HF_HUB_OFFLINE="1")
    overrides = ["data.val_size=0.15", f"train.max_steps={STEPS}", f"train.eval_steps={STEPS}", "train.num_threads=2"]
    cmd = [sys.executable, "-m", "studio.cli", "train", str(REPO / "presets" / "quick-demo.yaml")]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = Store(home / "studio.db")
    (run,) = store.list_runs()
    assert run.status == RunStatus.COMPLETED
    return {"home": home, "run": run, "store": store}


@pytest.fixture
def env_home(trained, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(trained["home"]))
    return trained["home"]


def test_validation_split_adapter_beats_base_and_the_report_is_saved(trained, env_home):
    run = trained["run"]
    said: list[str] = []
    report = E.evaluate_run(E.EvalSpec(run.id, gen_samples=4, max_new_tokens=32), env_home, progress=said.append)
    assert any(m.startswith("Loading run") for m in said) and any(m.startswith("Report saved to") for m in said)

    run_json = json.loads((Path(run.adapter_dir) / "run.json").read_text())
    assert report.dataset == E.VALIDATION and report.samples == run_json["eval_samples"] == 11
    # The held-out paraphrases state facts the base cannot know and the adapter learned.
    assert report.loss.adapter < 0.5 * report.loss.base, report.loss
    assert report.perplexity.base == pytest.approx(math.exp(report.loss.base))
    assert report.perplexity.adapter == pytest.approx(math.exp(report.loss.adapter))
    # The very rows the Trainer held out, scored the same way: its eval loss at the last step agrees (it
    # averages per-batch means, we weigh by tokens, so not to the last digit).
    (trainer_eval,) = [m.eval_loss for m in trained["store"].metrics(run.id) if m.eval_loss is not None]
    assert report.loss.adapter == pytest.approx(trainer_eval, rel=0.02)

    g = report.generation
    assert (g.prompts, g.max_new_tokens, len(report.examples)) == (4, 32, 4)
    assert g.adapter.chrf > g.base.chrf and g.adapter.rouge_l > g.base.rouge_l
    assert any(ex.base != ex.adapter for ex in report.examples)
    assert all(ex.prompt and ex.reference and ex.adapter for ex in report.examples)

    folder = Path(run.run_dir) / "eval"
    latest = json.loads((folder / "latest.json").read_text())
    assert latest == report.to_dict()
    keys = ["run_id", "dataset", "samples", "created_at", "loss", "perplexity", "generation", "examples"]
    # One schema for every run: "preference" is there, null, when the data holds no pairs.
    assert list(latest) == [*keys, "preference"] and latest["preference"] is None
    assert [p for p in folder.glob("2*.json") if json.loads(p.read_text()) == latest]
    assert E.load_latest(run.run_dir) == report


def test_a_registered_dataset_and_the_cli_text(trained, env_home, capsys):
    import argparse

    run = trained["run"]
    parser = EC.add_arguments(argparse.ArgumentParser(prog="studio eval"))
    args = parser.parse_args([run.id, "--dataset", "studio-chats", "--samples", "6", "--gen-samples", "2"])
    args.max_new_tokens = 16
    assert EC.run_cli(args) == 0
    out = capsys.readouterr()
    assert f"Run {run.id} on studio-chats: 6 samples for loss, 2 prompts" in out.out
    assert "perplexity" in out.out and "[2] prompt:" in out.out and "adapter:" in out.out
    assert "[eval] Loss on 6 samples of studio-chats" in out.err

    report = E.load_latest(run.run_dir)
    assert (report.dataset, report.samples, report.generation.prompts) == ("studio-chats", 6, 2)
    assert all(math.isfinite(v) and v > 0 for v in (report.loss.base, report.loss.adapter))
    assert report.loss.adapter != report.loss.base


def test_the_tab_evaluates_in_a_child_process_that_is_gone_after(trained, eval_child_pids):
    from studio.ui import evaluate as U

    pids = eval_child_pids
    ctx = UIContext(trained["home"])
    run_id = trained["run"].id
    try:
        steps = list(U.run_evaluation(ctx, run_id, "studio-facts", 8, 2, 16))
        statuses = [status for status, _, _ in steps]
        assert any("Loading run" in s for s in statuses) and any("Generating 2 answers" in s for s in statuses)
        message, table, examples = steps[-1]
        assert message.startswith("**Evaluated:**") and "studio-facts" in message, message
        assert list(table["metric"]) == [r["metric"] for r in E.summary_table(E.load_latest(trained["run"].run_dir))]
        assert len(examples) == 2 and set(examples.columns) == {"prompt", "reference", "base", "adapter"}
        loss = table.set_index("metric").loc["loss"]
        assert loss["adapter"] < loss["base"]  # studio-facts itself: rows the adapter trained on
        assert len(pids) == 1 and not Path(f"/proc/{pids[0]}").exists()  # ended and reaped

        # A page closed mid-evaluation: the generator is closed and the child goes with it.
        running = E.eval_process(E.EvalSpec(run_id, gen_samples=8, max_new_tokens=64), trained["home"])
        first = next(running)
        assert isinstance(first, str) and len(pids) == 2 and Path(f"/proc/{pids[1]}").exists()
        running.close()
        assert not Path(f"/proc/{pids[1]}").exists()

        # A failure in the child comes back as its own message.
        ((message, _, _),) = [s for s in U.run_evaluation(ctx, run_id, "studio-facts", 8, 2, 16, timeout_s=0.5)][1:]
        assert message.startswith("**Evaluation failed:**") and "was stopped" in message
        assert len(pids) == 3 and not Path(f"/proc/{pids[2]}").exists()
    finally:
        for pid in pids:
            kill_tree(pid)
