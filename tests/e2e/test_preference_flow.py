"""A preference run in the browser (issue 15): upload a pairs file (detected as preference, chosen and
rejected side by side), register it, switch the Train form to DPO, start, and watch the rewards chart fill
in while the run goes. (Comparing and judging answers in the Chat tab is in test_browser_flow.)"""

from __future__ import annotations

import time

from studio.core.store import Store
from studio.core.workspace import db_path
from tests.e2e.conftest import REPO, plot_points
from tests.e2e.test_browser_flow import choose, open_tab, set_number, shot, text_of, wait_text


def test_register_pairs_and_watch_a_dpo_run(server, page):
    try:
        _flow(server, page)
    except BaseException:
        shot(page, "preference-failure")
        raise


def _flow(server, page) -> None:
    page.goto(server.url)
    page.wait_for_selector("#ds-upload")
    page.locator("#ds-upload input[type=file]").set_input_files(str(REPO / "datasets" / "studio_prefs.jsonl"))
    message = wait_text(page, "ds-message", "usable as preference (detected)")
    assert "72 rows read, 72 usable" in message
    preview = text_of(page, "ds-preview")
    assert "Ripple here!" in preview and "rejected" in preview  # the pairs, side by side
    page.locator("#ds-name textarea, #ds-name input").first.fill("prefs-e2e")
    page.locator("#ds-register").click()
    wait_text(page, "ds-message", "Registered 'prefs-e2e'")
    shot(page, "p1-datasets")

    # Train: picking the stage alone keeps the preset's SFT data, which DPO refuses, saying which and why.
    open_tab(page, "Train")
    choose(page, "train-stage", "dpo")
    page.wait_for_selector("#pref-beta", state="visible")  # the stage's own section
    page.locator("#train-start").click()
    wait_text(page, "train-message", "is alpaca data, one answer per prompt")
    assert not Store(db_path(server.home)).list_runs()  # refused: nothing was created
    # The quick-dpo preset sets the stage and its pairs; add the registered file beside them.
    choose(page, "train-preset", "quick-dpo")
    wait_text(page, "train-command", "stage: dpo")
    choose(page, "train-dataset", "prefs-e2e")
    set_number(page, "train-max-steps", 4)
    set_number(page, "train-logging-steps", 1)
    page.locator("#train-start").click()
    wait_text(page, "train-status", "running", timeout=60)
    counts = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if page.locator("#pref-plot").is_visible():
            counts.append(plot_points(page, "pref-plot"))
        if "completed" in text_of(page, "train-status"):
            break
        page.wait_for_timeout(300)
    status = text_of(page, "train-status")
    assert "completed" in status, status
    assert page.locator("#pref-plot").is_visible() and max(counts, default=0) > 0, counts
    shot(page, "p2-train-dpo")
    (run,) = Store(db_path(server.home)).list_runs()
    assert run.config["stage"] == "dpo" and run.config["data"]["datasets"] == ["studio-prefs", "prefs-e2e"]
    margins = [m.reward_margin for m in Store(db_path(server.home)).metrics(run.id) if m.reward_margin is not None]
    assert len(margins) == 4, margins  # one logged point per step
