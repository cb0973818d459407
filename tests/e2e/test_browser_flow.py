"""A person's whole path through the studio, in headless Chromium against a real `studio serve`:
register a bundled sample by upload, train the bundled model briefly while the loss chart fills in,
chat with the adapter (streamed), compare with the base, export a merged model. Screenshots of every
tab go to test-artifacts/."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect

from bench.common import choose
from studio.core.store import Store
from studio.core.workspace import db_path
from tests.e2e.conftest import ARTIFACTS, REPO, plot_points, wait_plot_points

pytestmark = pytest.mark.e2e

QUESTION = "What is the mascot of LoRA Studio?"


def open_tab(page, label: str) -> None:
    """Click a tab and wait until it is the selected one (its panel is then shown)."""
    tab = page.get_by_role("tab", name=label)
    tab.click()
    expect(tab).to_have_attribute("aria-selected", "true")


def set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def text_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def wait_text(page, elem_id: str, needle: str, timeout: float = 120.0) -> str:
    """Until the element's text contains needle (checked in the page every 250 ms); its text."""
    try:
        page.wait_for_function(
            "([id, n]) => { const el = document.getElementById(id); return !!el && el.innerText.includes(n) }",
            arg=[elem_id, needle],
            timeout=timeout * 1000,
            polling=250,
        )
    except PlaywrightTimeout:
        text = text_of(page, elem_id) if page.locator(f"#{elem_id}").count() else "(no such element)"
        raise AssertionError(f"#{elem_id} never showed {needle!r}; last text: {text[:500]!r}") from None
    return text_of(page, elem_id)


def send(page, text: str) -> None:
    """Type a chat message and send it; type again if a finishing reply handler cleared the box."""
    box = page.locator("#chat-input textarea")
    for _ in range(3):
        box.fill(text)
        page.wait_for_timeout(500)
        if box.input_value() == text:
            break
    page.locator("#chat-send").click()


def wait_replies_settled(page, ids: list[str], quiet_s: float = 2.0, timeout_s: float = 120.0) -> None:
    """Until the last bot message of each chatbot is non-empty and has not changed for quiet_s: the streams
    have finished (a reply may pause between tokens, so one unchanged reading is not enough)."""
    page.wait_for_function(
        """([ids, quietMs]) => {
            const texts = ids.map(id => {
                const msgs = document.querySelectorAll(`#${id} [data-testid=bot]`);
                return msgs.length ? msgs[msgs.length - 1].innerText : "";
            });
            const key = JSON.stringify(texts), now = Date.now();
            if (window.__repliesKey !== key) { window.__repliesKey = key; window.__repliesSince = now; }
            return texts.every(t => t.trim().length > 0) && now - window.__repliesSince >= quietMs;
        }""",
        arg=[ids, quiet_s * 1000],
        timeout=timeout_s * 1000,
        polling=100,
    )


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_register_train_chat_compare_export(server, page):
    try:
        _flow(server, page)
    except BaseException:
        shot(page, "failure")
        raise


def _flow(server, page) -> None:
    page.goto(server.url)
    page.wait_for_selector("#ds-upload")

    # Datasets: upload a bundled sample file and register it under a new name.
    page.locator("#ds-upload input[type=file]").set_input_files(str(REPO / "datasets" / "studio_facts.json"))
    wait_text(page, "ds-message", "72")  # validated on upload: 72 rows, no errors
    page.locator("#ds-name textarea, #ds-name input").first.fill("facts-e2e")
    page.locator("#ds-register").click()
    wait_text(page, "ds-message", "Registered 'facts-e2e'")
    assert "⟦" in text_of(page, "ds-preview")  # the trained part is marked in the preview
    shot(page, "1-datasets")

    # Train: the quick-demo form, on the new dataset, cut to a few steps with a point per step.
    open_tab(page, "Train")
    choose(page, "train-dataset", "facts-e2e")
    set_number(page, "train-max-steps", 8)
    set_number(page, "train-logging-steps", 1)
    page.locator("#train-start").click()
    wait_text(page, "train-status", "running", timeout=60)
    counts = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        counts.append(plot_points(page, "loss-plot"))
        if "completed" in text_of(page, "train-status"):
            break
        page.wait_for_timeout(300)
    status = text_of(page, "train-status")
    assert "completed" in status, status
    seen = sorted(set(c for c in counts if c))
    assert len(seen) >= 3, f"the loss chart should gain points while the run goes, saw counts {seen}"
    wait_plot_points(page, "loss-plot", 8, timeout_s=30)  # the last tick's figure may land after the status
    assert plot_points(page, "loss-plot") == 8
    assert "8/8" in text_of(page, "train-progress") or "8/8" in status
    shot(page, "2-train")

    (run,) = Store(db_path(server.home)).list_runs()
    run_id = run.id
    assert run_id in status and run.status.value == "completed"
    open_tab(page, "Runs")
    wait_text(page, "runs-table", run_id[:15])
    shot(page, "3-runs")

    # Chat: load the adapter, ask, watch the answer stream in; then compare with the base.
    open_tab(page, "Chat")
    choose(page, "chat-adapter", run_id)
    page.locator("#chat-load").click()
    status = wait_text(page, "chat-status", "Loaded:", timeout=120)
    assert run_id in status  # the adapter is loaded, and answers (the active choice follows the load)
    send(page, QUESTION)
    lengths = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        bot = page.locator("#chatbot [data-testid=bot]").last
        if bot.count():
            lengths.append(len(bot.inner_text()))
        # Done when the text has stood still for 2 s (the reply may pause between tokens).
        if len(lengths) > 20 and lengths[-1] > 0 and len(set(lengths[-20:])) == 1:
            break
        page.wait_for_timeout(100)
    assert len(set(lengths) - {0}) >= 2, f"the answer should arrive in pieces, saw lengths {lengths}"
    shot(page, "4-chat")

    page.locator("#chat-compare input[type=checkbox]").check()
    send(page, QUESTION)
    page.wait_for_function(
        """() => ['chatbot', 'chatbot-base'].every(id => {
            const msgs = document.querySelectorAll(`#${id} [data-testid=bot]`);
            return msgs.length && msgs[msgs.length - 1].innerText.trim().length > 0;
        })""",
        timeout=120_000,
    )
    wait_replies_settled(page, ["chatbot", "chatbot-base"])
    adapter_answer = page.locator("#chatbot [data-testid=bot]").last.inner_text()
    base_answer = page.locator("#chatbot-base [data-testid=bot]").last.inner_text()
    assert adapter_answer.strip() and base_answer.strip() and adapter_answer != base_answer
    # Blind by default: the sides are A and B, whichever model each is.
    assert "Answer A" in text_of(page, "chatbot-base") and "Answer B" in text_of(page, "chatbot")
    shot(page, "5-chat-compare")

    # Judge: A is better; the verdict names the models and the tally counts it. Save: a preference dataset.
    page.locator("#chat-vote-a").click()
    verdict = wait_text(page, "chat-feedback-tally", "1 judged, 1 preference pairs")
    assert "A was" in verdict and run_id in verdict
    page.locator("#chat-feedback-save").click()
    wait_text(page, "chat-feedback-tally", "Saved chat-feedback-v1: 1 preference pairs")
    from studio.data.registry import DatasetRegistry

    (pair,) = DatasetRegistry(server.home).load_preference("chat-feedback-v1")
    assert pair.chosen.strip() == base_answer.strip() and pair.rejected.strip() == adapter_answer.strip()

    # Export: merge onto the full-precision base and list the files.
    open_tab(page, "Export")
    choose(page, "export-run", run_id)
    page.locator("#export-merge").click()
    wait_text(page, "export-message", "saved to", timeout=300)
    assert "model.safetensors" in text_of(page, "export-files")
    merged = server.home / "exports" / f"{run_id}-merged"
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert Path(str(merged) + ".zip").is_file()
    shot(page, "6-export")
