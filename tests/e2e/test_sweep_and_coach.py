"""Sweeps and the coach in the browser: a real two-rank sweep queued through the Train tab's sweep endpoint
trains on the tiny model; the Runs tab shows it as a group (table, eval-loss curves, the pick and its
reason) and one click queues the long run from the pick. The coach's messages reach the page: a data
warning while a run trains, and the divergence stop after a run blew up."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from studio.core.config import RunConfig
from studio.core.store import RunStatus
from studio.runs.queue import JobManager
from tests.builders import small_run_config
from tests.e2e.conftest import ARTIFACTS
from tests.e2e.test_browser_flow import open_tab, shot, text_of, wait_text

pytestmark = pytest.mark.e2e


def tiny_config(model_dir, name: str, **train) -> RunConfig:
    return small_run_config(
        model_dir, name, data={"val_size": 0.2}, train={"eval_steps": 2, "save_steps": 1000, **train}
    )


def wait_run(jobs: JobManager, run_id: str, timeout: float = 180):
    run = jobs.wait(run_id, timeout=timeout)
    assert run.status.finished, f"{run_id} still {run.status.value} after {timeout} s"
    return run


def test_sweep_group_view_pick_and_long_run(server, page, tiny_model_dir):
    from gradio_client import Client

    from studio.ui.train import form_from_config

    jobs = JobManager(server.home)
    base = tiny_config(tiny_model_dir, "rank-scan", max_steps=10)  # 10 steps: the long run's length
    client = Client(server.url, verbose=False)
    text, first_run = client.predict("lora.r", "2,8", "(none)", "", 6, *form_from_config(base), api_name="/start_sweep")
    assert first_run, text
    sweep = jobs.store.list_sweeps()[0]
    scan = jobs.store.runs_of_sweep(sweep.id)
    assert [r.config["lora"]["r"] for r in scan] == [2, 8]  # smallest rank first
    assert [r.config["lora"]["alpha"] for r in scan] == [4, 16]  # the form's alpha/r = 2 is kept
    assert all(r.config["train"]["max_steps"] == 6 for r in scan)
    for run in scan:
        assert wait_run(jobs, run.id).status == RunStatus.COMPLETED, jobs.log_tail(run.id)

    page.goto(server.url)
    open_tab(page, "Runs")
    wait_text(page, "sweep-pick", "Recommended pick", timeout=60)
    pick_text = text_of(page, "sweep-pick")
    assert "eval loss" in pick_text  # the reason names what the pick was made on
    table = wait_text(page, "sweep-table", "lora.r=8", timeout=30)
    assert table.count("lora.r=") == 2 and table.count("★") == 1, table
    assert "lora.r=2" in table and "completed" in table, table
    traces = page.evaluate(
        """() => { const el = document.querySelector('#sweep-plot .js-plotly-plot');
                   return el && el.data ? el.data.map(t => [t.name, (t.x || []).length]) : []; }"""
    )
    eval_traces = [(name, n) for name, n in traces if name.endswith(" eval")]
    assert len(eval_traces) == 2 and all(n >= 3 for _, n in eval_traces), traces  # evals at steps 2, 4, 6
    shot(page, "sweep-view")

    page.locator("#sweep-promote").click()
    wait_text(page, "runs-message", "Long run", timeout=30)
    sweep = jobs.store.get_sweep(sweep.id)
    assert sweep.long_run_id
    _, _, pick = jobs.sweep_summary(sweep.id)
    long_run = jobs.store.get_run(sweep.long_run_id)
    assert long_run.config["lora"]["r"] == pick.values["lora.r"]
    assert long_run.config["train"]["max_steps"] == 10  # the base config's length, not the scan's
    assert wait_run(jobs, long_run.id).status == RunStatus.COMPLETED
    wait_text(page, "sweep-pick", long_run.id, timeout=30)

    # A second click does not queue a second long run.
    page.locator("#sweep-promote").click()
    wait_text(page, "runs-message", long_run.id, timeout=30)
    assert sum(1 for r in jobs.store.list_runs() if r.sweep_id == sweep.id) == 3


def test_sweep_button_reports_bad_values_and_queues_nothing(server, page):
    jobs = JobManager(server.home)
    before = len(jobs.store.list_runs())
    page.goto(server.url)
    open_tab(page, "Train")
    page.get_by_text("Sweep: scan a parameter").first.click()  # the accordion starts closed
    values = page.locator("#sweep-values textarea, #sweep-values input").first
    # An accordion that has just opened can still render its default ("8,16,32,64") over a fast fill,
    # which would queue a real four-run sweep: wait for the default to be there, then replace it.
    expect(values).to_have_value("8,16,32,64")
    values.fill("8")
    expect(values).to_have_value("8")
    values.press("Tab")  # commit the value to the server-side component before the click reads it
    page.locator("#sweep-start").click()
    text = wait_text(page, "train-message", "lora.r", timeout=30)
    assert "2" in text  # says that a sweep needs at least two values
    assert len(jobs.store.list_runs()) == before, [r.name for r in jobs.store.list_runs()]


def test_coach_messages_reach_the_page(server, page, tiny_model_dir):
    jobs = JobManager(server.home)
    # Heavy truncation: a cutoff of 48 tokens cuts about 90% of the studio-facts samples.
    truncating = tiny_config(tiny_model_dir, "short-cutoff", max_steps=20000)
    truncating.data.cutoff_len = 48
    truncating.data.val_size = 0.0
    run = jobs.submit(truncating)
    try:
        page.goto(server.url)
        open_tab(page, "Train")
        wait_text(page, "train-status", run.id, timeout=60)
        wait_text(page, "train-status", "running", timeout=60)
        coach = wait_text(page, "train-coach", "truncat", timeout=60)
        assert "data.cutoff_len" in coach  # the fix names the setting
        shot(page, "coach-truncation")
    finally:
        jobs.abort(run.id)
        wait_run(jobs, run.id)

    # Divergence: an absurd learning rate on the bundled model (the tiny random one cannot diverge: its
    # logits stay small); the coach stops the run within a few steps and says why.
    blowing_up = tiny_config("bundled", "too-hot", max_steps=60, learning_rate=0.9, max_grad_norm=0.0)
    blowing_up.train.batch_size, blowing_up.train.grad_accum = 2, 1
    blowing_up.data.val_size = 0.0
    run = jobs.submit(blowing_up)
    done = wait_run(jobs, run.id)
    assert done.status == RunStatus.FAILED and done.step < 60, (done.status, done.step, done.error)
    page.reload()
    open_tab(page, "Runs")
    page.locator("#runs-select input[role=combobox]").click()
    page.locator("#runs-select input[role=combobox]").fill(run.id)
    page.get_by_role("option", name=run.id).first.click()
    page.keyboard.press("Escape")
    coach = wait_text(page, "runs-coach", "train.learning_rate", timeout=30)
    assert any(word in coach.lower() for word in ("diverg", "nan", "explod")), coach
    shot(page, "coach-divergence")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "coach-divergence.txt").write_text(coach)
