"""The page holds no run state of its own: a run started outside the browser (as `studio train` does)
shows up in every open page, a reload re-attaches to it with its metrics, an Abort pressed in one page
is seen by the other, and the worker is never the web server's process."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from studio.core.config import RunConfig
from studio.core.store import RunStatus
from studio.runs.queue import JobManager
from tests.e2e.conftest import plot_points, wait_plot_points
from tests.e2e.test_browser_flow import shot, wait_text

pytestmark = pytest.mark.e2e


def long_tiny_run(model_dir) -> RunConfig:
    cfg = RunConfig(name="from-the-cli")
    cfg.model.source = str(model_dir)
    cfg.data.datasets = ["studio-facts"]
    cfg.data.cutoff_len = 64
    cfg.lora.r = 4
    cfg.train.max_steps = 20000  # long enough to still be running while the pages look at it
    cfg.train.logging_steps = 5
    cfg.train.save_steps = 50
    cfg.train.num_threads = 1
    return cfg


def open_train(page, url: str) -> None:
    page.goto(url)
    page.get_by_role("tab", name="Train").click()


def test_pages_see_a_cli_run_reload_reattaches_and_abort_reaches_all(server, browser, tiny_model_dir):
    jobs = JobManager(server.home)
    run = jobs.submit(long_tiny_run(tiny_model_dir))
    assert run.status == RunStatus.RUNNING and run.pid != server.proc.pid  # its own process
    pages = [browser.new_context(viewport={"width": 1400, "height": 1000}).new_page() for _ in range(2)]
    try:
        for page in pages:
            open_train(page, server.url)
            wait_text(page, "train-status", run.id, timeout=60)
            wait_text(page, "train-status", "running", timeout=60)
        first, second = pages
        # The watched run's loss curve is drawn from the store.
        wait_plot_points(first, "loss-plot", 2, timeout_s=60)
        page_points = plot_points(first, "loss-plot")

        first.reload()
        first.get_by_role("tab", name="Train").click()
        wait_text(first, "train-status", run.id, timeout=60)  # re-attached after the reload
        wait_plot_points(first, "loss-plot", page_points, timeout_s=30)
        shot(first, "7-reattached")

        first.locator("#train-abort").click()
        # Each step of the abort's way is waited for, so a failure says which one did not happen: the page's
        # handler answered, the worker stopped and the store says so, then the other page's timer shows it.
        expect(first.locator("#train-message")).to_contain_text("Abort requested", timeout=60_000)
        done = jobs.wait(run.id, timeout=120)
        assert done.status == RunStatus.ABORTED and done.pid is None, (done.status, done.step, jobs.log_tail(run.id))
        wait_text(second, "train-status", "aborted", timeout=60)  # the other page sees it too
        wait_text(first, "train-status", "aborted", timeout=60)

        second.get_by_role("tab", name="Runs").click()
        wait_text(second, "runs-table", "from-the-cli", timeout=30)
    finally:
        for page in pages:
            page.context.close()
        current = jobs.store.get_run(run.id)
        if current.status == RunStatus.RUNNING:
            jobs.abort(run.id)
            jobs.wait(run.id, timeout=60)
