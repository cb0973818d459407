"""The studio as an API: gradio_client registers a dataset by upload, starts a run, polls it to
completion and chats with the adapter, with no browser."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.conftest import REPO

pytestmark = pytest.mark.e2e


def test_register_train_poll_chat_over_the_api(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False)
    data = tmp_path / "qa.jsonl"
    rows = json.loads((REPO / "datasets" / "studio_facts.json").read_text())
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))  # the bundled sample, as JSON Lines
    message, *_ = client.predict(
        handle_file(str(data)),
        "",
        "alpaca",
        "api-facts",
        "registered over the API",
        False,
        api_name="/register_dataset",
    )
    assert "Registered 'api-facts'" in message
    assert (server.home / "datasets" / "api-facts").is_dir()

    message, run_id = client.predict("quick-demo", "api-facts", 4, "api-run", api_name="/start_preset_run")
    assert run_id, message
    deadline = time.monotonic() + 300
    status = {}
    while time.monotonic() < deadline:
        status = client.predict(run_id, api_name="/run_status")
        if status["status"] in ("completed", "failed", "aborted", "interrupted"):
            break
        time.sleep(1)
    assert status["status"] == "completed", status
    assert status["step"] == status["total_steps"] == 4

    reply = client.predict("What is the mascot of LoRA Studio?", run_id, "", 24, api_name="/chat")
    assert isinstance(reply, str) and reply.strip()
    base = client.predict("What is the mascot of LoRA Studio?", "base", "", 24, api_name="/chat")
    assert base.strip() and base != reply
