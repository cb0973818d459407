"""Tool calling is learned (issue 15): the quick-tools preset through `studio train` (the real worker) on the
bundled studio-tools sample, then the Chat tab's chat process, given the same schemas, answers held-out questions
with the right call, where the base model calls nothing; a question the tools do not serve stays a plain
answer. The bundled model's template knows no tools, so this is the fallback format end to end."""

from __future__ import annotations

import json

import pytest

from studio.core.store import RunStatus, Store
from studio.data.registry import DatasetRegistry
from studio.data.tools import calls_in_text
from studio.services.chat import GenerationSettings
from studio.services.chatproc import ChatProcess

from .test_preference_training import train_preset

pytestmark = pytest.mark.integration

# Ports and towns that are not in studio-tools (the call must copy the name from the question), asked in
# the sample's phrasings and in two it does not have.
HELD_OUT = [
    ("When does the next ferry leave Glimmerholt?", "get_ferry_schedule", {"port": "Glimmerholt"}),
    ("What's the weather in Rookmere?", "get_weather", {"town": "Rookmere"}),
    ("Is there a boat from Quillan today?", "get_ferry_schedule", {"port": "Quillan"}),
    ("How cold is it in Brisk?", "get_weather", {"town": "Brisk"}),
]


@pytest.fixture(scope="module")
def tools_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("tools-home")
    proc = train_preset(home, "quick-tools")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = Store(home / "studio.db")
    (run,) = store.list_runs()
    schemas = DatasetRegistry(home).load_examples("studio-tools")[0].tools
    return {"home": home, "run": run, "store": store, "tools": schemas}


def test_the_run_completes_and_its_loss_falls(tools_run):
    run = tools_run["run"]
    assert run.status == RunStatus.COMPLETED
    losses = [m.loss for m in tools_run["store"].metrics(run.id) if m.loss is not None]
    assert len(losses) >= 6 and sum(losses[-2:]) / 2 < 0.5 * sum(losses[:2]) / 2, losses


def test_the_adapter_calls_the_right_tool_where_the_base_calls_none(tools_run):
    session = ChatProcess(home=tools_run["home"], token_timeout_s=300, load_timeout_s=600)
    session.start("bundled")
    session.add_adapter("tools", tools_run["run"].adapter_dir)
    try:
        _check_answers(session, tools_run["tools"])
    finally:
        session.unload()


def _check_answers(session: ChatProcess, tools: str) -> None:
    greedy = GenerationSettings(temperature=0, max_new_tokens=48)
    for question, name, arguments in HELD_OUT:
        messages = [{"role": "user", "content": question}]
        base, tuned = session.compare(messages, "tools", greedy, tools)
        assert calls_in_text(base) == [], base
        calls = calls_in_text(tuned)
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [(name, arguments)], tuned
    # The tools are offered but do not serve this question: no call, the fact itself.
    plain = session.reply([{"role": "user", "content": "What is the capital of Veloria?"}], greedy, "tools", tools)
    assert calls_in_text(plain) == [] and "Port Amsel" in plain, plain
    # And the result of a call is used: the answer after the tool's reply repeats what the tool said.
    ferry = [
        {"role": "user", "content": HELD_OUT[0][0]},
        {"role": "assistant", "content": calls_in_text_as_written(HELD_OUT[0])},
        {"role": "tool", "content": json.dumps({"port": "Glimmerholt", "next_departure": "17:45", "to": "Lisk"})},
    ]
    answer = session.reply(ferry, greedy, "tools", tools)
    assert "17:45" in answer and calls_in_text(answer) == [], answer


def calls_in_text_as_written(case) -> str:
    _, name, arguments = case
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"
