"""The Chat tab's pure callbacks: adapter choices from the store, settings from widgets, histories, and the
load/send/answer flows against a fake ChatProcess (the real one is under test in integration)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from studio.core.store import RunStatus, Store
from studio.core.workspace import db_path
from studio.services.chat import BASE, GenerationSettings
from studio.services.chatproc import ChatError
from studio.ui import chat as ui


@pytest.fixture
def store(home) -> Store:
    s = Store(db_path(home))
    yield s
    s.close()


def make_run(store: Store, home: Path, run_id: str, status: RunStatus, adapter: bool = True, source="bundled"):
    run_dir = home / "runs" / run_id
    run_dir.mkdir(parents=True)
    store.create_run(run_id, f"name-{run_id}", {"model": {"source": source}}, str(run_dir))
    if status == RunStatus.QUEUED:
        return
    store.transition(run_id, RunStatus.RUNNING, pid=1)
    adapter_dir = run_dir / "adapter"
    if adapter:
        adapter_dir.mkdir()
        (adapter_dir / "adapter_config.json").write_text("{}")
        (adapter_dir / "adapter_model.safetensors").write_bytes(b"")
    store.transition(run_id, status, adapter_dir=str(adapter_dir) if status == RunStatus.COMPLETED else None)


class FakeProcess:
    """Stands in for ChatProcess: records calls, streams a canned reply piece by piece."""

    def __init__(self, alive: bool = False, fail_with: str | None = None) -> None:
        self.base = ("bundled", "fp32", "none") if alive else None
        self.loaded_adapters: dict[str, str] = {}
        self.calls: list[tuple] = []
        self.fail_with = fail_with

    @property
    def alive(self) -> bool:
        return self.base is not None

    pid = 4242
    memory_mb = 512.0

    def start(self, source="bundled", dtype="fp32", quant_mode="none"):
        self.calls.append(("start", source, dtype))
        self.base, self.loaded_adapters = (source, dtype, quant_mode), {}
        return self.status()

    def add_adapter(self, name, path):
        self.calls.append(("add", name))
        self.loaded_adapters[name] = str(path)

    def remove_adapter(self, name):
        self.calls.append(("remove", name))
        self.loaded_adapters.pop(name, None)

    def status(self):
        return {"loaded": self.alive, "pid": self.pid, "rss_mb": 512.0, "adapters": dict(self.loaded_adapters)}

    def stream(self, messages, settings=None, adapter=None, tools=None):
        self.calls.append(("stream", adapter, messages) + ((tools,) if tools else ()))
        text = ""
        pieces = (
            (f"[{adapter}]", " hello", " there") if not tools else ("<tool_call>\n", '{"name": "f"}', "\n</tool_call>")
        )
        for piece in pieces:
            text += piece
            yield text
        if self.fail_with:
            raise ChatError(self.fail_with)

    def reply(self, messages, settings=None, adapter=None, tools=None):
        return list(self.stream(messages, settings, adapter, tools))[-1]


def test_adapter_choices_list_completed_runs_with_an_adapter(store, home):
    make_run(store, home, "r-done", RunStatus.COMPLETED)
    make_run(store, home, "r-noadapter", RunStatus.COMPLETED, adapter=False)
    make_run(store, home, "r-failed", RunStatus.FAILED)
    make_run(store, home, "r-queued", RunStatus.QUEUED)
    assert ui.adapter_choices(store) == [("name-r-done (r-done)", "r-done")]


def test_run_adapter_explains_each_refusal(store, home):
    make_run(store, home, "good", RunStatus.COMPLETED, source="/models/x")
    make_run(store, home, "failed", RunStatus.FAILED)
    make_run(store, home, "empty", RunStatus.COMPLETED, adapter=False)
    got = ui.run_adapter(store, "good")
    assert got.run_id == "good" and got.base_source == "/models/x" and got.path.endswith("adapter")
    with pytest.raises(ui.ChatUIError, match="no run 'nope'"):
        ui.run_adapter(store, "nope")
    with pytest.raises(ui.ChatUIError, match="is failed; only a completed run"):
        ui.run_adapter(store, "failed")
    with pytest.raises(ui.ChatUIError, match="has no adapter on disk"):
        ui.run_adapter(store, "empty")


def test_settings_from_widgets_converts_and_lists_every_problem():
    s = ui.settings_from_widgets(0.7, 0.9, 40.0, 64.0, 1.2)
    assert s == GenerationSettings(max_new_tokens=64, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.2)
    with pytest.raises(ui.ChatUIError) as err:
        ui.settings_from_widgets(9, 0.9, 40, 0, 1.1)
    assert len(err.value.problems) == 2 and "temperature" in str(err.value) and "max_new_tokens" in str(err.value)
    with pytest.raises(ui.ChatUIError, match="needs a number"):
        ui.settings_from_widgets(None, 0.9, 40, 64, 1.1)


def test_history_in_gradio6_parts_becomes_plain_messages():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": None},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
    ]
    assert ui.to_messages(history, "  Be brief. ", "and now?") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and now?"},
    ]
    assert ui.to_messages(None, "", "x") == [{"role": "user", "content": "x"}]
    assert ui.with_reply(history, "q", "a")[-2:] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    assert ui.text_of("plain") == "plain" and ui.text_of(None) == ""


def test_status_markdown_says_what_is_loaded():
    assert "No chat model loaded" in ui.status_markdown({"loaded": False})
    md = ui.status_markdown(
        {"loaded": True, "name": "tiny", "dtype": "fp32", "adapters": {"r1": "/a"}, "pid": 77, "rss_mb": 1234.5}
    )
    assert "tiny" in md and "`r1`" in md and "pid 77" in md and "1,234 MB" in md
    assert ui.status_markdown({"loaded": False}, "Unloaded.").endswith("Unloaded.")
    assert ui.active_choices({"r1": "/a"}) == [("base (no adapter)", BASE), ("r1", "r1")]


def test_load_chat_starts_once_and_matches_the_chosen_adapters(store, home):
    make_run(store, home, "a", RunStatus.COMPLETED)
    make_run(store, home, "b", RunStatus.COMPLETED, source="/elsewhere")
    proc = FakeProcess()
    info, note = ui.load_chat(proc, store, "bundled", ["a", "b"])
    assert info["loaded"] and set(proc.loaded_adapters) == {"a", "b"}
    assert "trained on `/elsewhere`" in note
    proc.calls.clear()
    ui.load_chat(proc, store, "bundled", ["b"])
    assert proc.calls == [("remove", "a")]  # same base: no restart, only the adapter set changes
    with pytest.raises(ui.ChatUIError, match="no run"):
        ui.load_chat(proc, store, "other-model", ["missing"])
    assert proc.base[0] == "bundled"  # a bad choice is refused before anything is restarted


def test_load_chat_quantization_restarts_the_base_and_shows(store, home):
    proc = FakeProcess()
    ui.load_chat(proc, store, "bundled", [], "bf16", "4bit")
    assert proc.base == ("bundled", "bf16", "4bit")
    ui.load_chat(proc, store, "bundled", [], "bf16", "4bit")
    assert [c for c in proc.calls if c[0] == "start"] == [("start", "bundled", "bf16")]  # same base: no restart
    ui.load_chat(proc, store, "bundled", [], "bf16")
    assert proc.base == ("bundled", "bf16", "none")  # full precision is another base: restarted
    md = ui.status_markdown({"loaded": True, "name": "tiny", "dtype": "bf16", "quant_mode": "4bit", "pid": 1})
    assert "(bf16, base in 4bit)" in md
    with pytest.raises(ui.ChatUIError, match="Quantization must be one of none, 8bit, 4bit"):
        ui.load_chat(proc, store, "bundled", [], "fp32", "3bit")


def test_send_streams_growing_history_and_compare_answers_base_first():
    proc = FakeProcess(alive=True)
    proc.loaded_adapters["r1"] = "/a"
    settings = GenerationSettings(max_new_tokens=8)
    steps = list(ui.send_chat(proc, "hi", [], [], "sys", settings, "r1", compare=False))
    replies = [shown[-1]["content"] for shown, _ in steps]
    assert replies[0] == "" and replies[-1] == "[r1] hello there"
    assert all(b.startswith(a) for a, b in itertools.pairwise(replies))
    assert proc.calls[-1][2][0] == {"role": "system", "content": "sys"}

    steps = list(ui.send_chat(proc, "hi", [], [], "", settings, "r1", compare=True))
    final, final_base = steps[-1]
    assert final_base[-1]["content"] == "[base] hello there" and final[-1]["content"] == "[r1] hello there"
    assert [c[1] for c in proc.calls[-2:]] == [BASE, "r1"]  # base first, on the left


def test_send_refuses_with_actionable_messages():
    settings = GenerationSettings()
    with pytest.raises(ui.ChatUIError, match="press Load"):
        list(ui.send_chat(FakeProcess(), "hi", [], [], "", settings, BASE, False))
    with pytest.raises(ui.ChatUIError, match="Compare needs two different models"):
        list(ui.send_chat(FakeProcess(alive=True), "hi", [], [], "", settings, BASE, True))
    with pytest.raises(ui.ChatUIError, match="Type a message"):
        list(ui.send_chat(FakeProcess(alive=True), "  ", [], [], "", settings, BASE, False))
    crashing = FakeProcess(alive=True, fail_with="The chat process ended unexpectedly")
    with pytest.raises(ChatError, match="ended unexpectedly"):
        list(ui.send_chat(crashing, "hi", [], [], "", settings, BASE, False))


def test_answer_loads_the_runs_base_and_adapter_on_demand(store, home):
    make_run(store, home, "r1", RunStatus.COMPLETED, source="/models/tiny")
    proc = FakeProcess()
    assert ui.answer(proc, store, "hi", "r1", "", 16) == "[r1] hello there"
    assert proc.calls[:2] == [("start", "/models/tiny", "fp32"), ("add", "r1")]
    assert ui.answer(proc, store, "hi", "base", "", 16) == "[base] hello there"
    with pytest.raises(ui.ChatUIError, match="max_new_tokens"):
        ui.answer(proc, store, "hi", "base", "", 0)


def test_one_chat_process_per_workspace(tmp_path):
    a = ui.chat_process(tmp_path / "one")
    assert ui.chat_process(tmp_path / "one") is a
    assert ui.chat_process(tmp_path / "two") is not a
    assert not a.alive  # made lazily: no child process until Load


def test_build_makes_the_widgets_and_endpoints(home):
    import gradio as gr

    from studio.ui.common import UIContext

    with gr.Blocks() as app, gr.Tab("Chat") as tab:
        ui.build(UIContext(home=home), tab)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    expected = {
        "chat-model", "chat-adapter", "chat-load", "chat-unload", "chat-status", "chat-system", "chat-temperature",
        "chat-top-p", "chat-top-k", "chat-max-new-tokens", "chat-repetition-penalty", "chat-active", "chat-input",
        "chat-send", "chatbot", "chat-compare", "chatbot-base", "chat-clear", "chat-quant", "chat-tools",
        "chat-tools-example",
    }  # fmt: skip
    assert expected <= ids
    endpoints = app.get_api_info()["named_endpoints"]
    assert {"/chat", "/chat_load"} <= set(endpoints)
    load_params = endpoints["/chat_load"]["parameters"]
    assert [p["parameter_name"] for p in load_params] == ["source", "run_ids", "dtype_name", "quant_mode"]
    assert load_params[-1]["parameter_has_default"]  # older callers passing three values still work
    assert [p["parameter_name"] for p in endpoints["/chat"]["parameters"]] == [
        "message",
        "adapter",
        "system_prompt",
        "max_new_tokens",
        "tools",
    ]


def test_the_tabs_handlers_show_what_is_loaded_and_what_went_wrong(store, home):
    make_run(store, home, "r1", RunStatus.COMPLETED)
    proc = FakeProcess()
    adapters, active, status = ui.selection_updates(proc, store, ["r1", "gone"], "r1")
    assert adapters.value == ["r1"] and active.value == BASE and status.startswith("No chat model loaded")
    status, active = ui.load_updates(proc, store, "bundled", ["r1"], "fp32", "none")
    assert "`r1`" in status and active.value == "r1"
    status, active = ui.load_updates(proc, store, "bundled", ["r1"], "fp32", "2bit")
    assert "Quantization must be one of" in status and active.value == BASE
    proc.unload = lambda: setattr(proc, "base", None)
    status, active = ui.unload_updates(proc)
    assert "memory was given back" in status and active.value == BASE


def test_send_streams_then_shows_the_status_and_keeps_the_text_after_a_refusal():
    widgets = (0.0, 1.0, 0, 16, 1.0)
    steps = list(ui.send_updates(FakeProcess(alive=True), "hi", [], [], "", widgets, BASE, False))
    assert steps[-2][0][-1]["content"] == "[base] hello there" and steps[-2][2] == ""
    assert steps[-1][3].startswith("**Loaded:**")
    ((_, _, kept, message),) = ui.send_updates(FakeProcess(), "hi", [], [], "", widgets, BASE, False)
    assert kept == {"__type__": "update"} and "press Load" in message
    assert ui.compare_updates(True)[0].visible and ui.compare_updates(False)[1].label == "Chat"


SCHEMA = '[{"name": "f", "parameters": {"type": "object"}}]'


def test_tools_go_with_the_conversation_and_calls_show_as_blocks_that_go_back_as_written():
    proc = FakeProcess(alive=True)
    settings = GenerationSettings(max_new_tokens=8)
    steps = list(ui.send_chat(proc, "hi", [], [], "", settings, BASE, False, ui.tools_from_box(SCHEMA)))
    shown = steps[-1][0][-1]["content"]
    assert shown == '```tool_call\n{"name": "f"}\n```'  # a fenced block: markdown would hide the tag
    assert proc.calls[-1][3] == '[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]'
    # The next turn sends the call back as the model wrote it.
    again = ui.to_messages(steps[-1][0], "", "and now?")
    assert again[1] == {"role": "assistant", "content": '<tool_call>\n{"name": "f"}\n</tool_call>'}
    assert ui.tools_from_box("  ") is None


def test_bad_tools_in_the_box_are_refused_before_anything_is_sent(store, home):
    proc = FakeProcess(alive=True)
    with pytest.raises(ui.ChatUIError, match=r"'the tools box' is not valid JSON"):
        ui.answer(proc, store, "hi", "base", "", 16, "[{name}]")
    widgets = (0, 1, 0, 8, 1)
    *_, (_, _, kept, status) = ui.send_updates(proc, "hi", [], [], "", widgets, BASE, False, '[{"x": 1}]')
    assert "is not a function schema" in status and kept == ui.gr.skip() and proc.calls == []  # text kept
    example = json.loads(ui.example_tools(home))
    assert [t["name"] for t in example] == ["get_ferry_schedule", "get_weather"]


def test_blind_compare_draws_the_sides_once_per_conversation():
    import random

    draws = {ui.draw_sides([], [], None, BASE, "r1", True, random.Random(seed)) for seed in range(20)}
    assert draws == {(BASE, "r1"), ("r1", BASE)}  # either order, by chance
    assert ui.draw_sides([], [], None, BASE, "r1", False) == (BASE, "r1")  # not blind: base on the left
    ongoing = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]
    assert ui.draw_sides(ongoing, ongoing, ("r1", BASE), BASE, "r2", True) == ("r1", BASE)  # kept until Clear
    left, right, panel = ui.compare_updates(True, True, BASE, "r1")
    assert (left.label, right.label, panel.visible) == ("Answer A", "Answer B", True)
    left, right, _ = ui.compare_updates(True, False, BASE, "r1")
    assert (left.label, right.label) == ("Base model (no adapter)", "Adapter r1")
    assert ui.compare_updates(False)[2].visible is False


def test_judging_two_answers_keeps_a_pair_and_saving_makes_a_dataset_version(home):
    from studio.data.registry import DatasetRegistry

    proc = FakeProcess(alive=True)
    proc.loaded_adapters["r1"] = "/a"
    settings = GenerationSettings(max_new_tokens=8)
    with pytest.raises(ui.ChatUIError, match="Nothing to judge yet"):
        ui.judge(home, "a", "", "fb", [], [], None, "", None)
    # r1 on the left (A), base on the right (B), as a blind draw may give.
    *_, (right, left) = ui.send_chat(proc, "Mascot?", [], [], "sys", settings, BASE, True, None, "r1")
    assert (left[-1]["content"], right[-1]["content"]) == ("[r1] hello there", "[base] hello there")
    shown, judged = ui.judge(home, "a", "Ripple!", "fb", right, left, ("r1", BASE), "sys", None)
    assert shown.startswith("Judged A is better: A was adapter r1, B was base model (no adapter).")
    assert "**fb**: 1 judged, 1 preference pairs." in shown and "1 : 0, 0 ties" in shown
    with pytest.raises(ui.ChatUIError, match="judged already"):
        ui.judge(home, "b", "", "fb", right, left, ("r1", BASE), "sys", judged)
    saved = ui.save_feedback(home, "fb")
    assert saved.startswith("Saved **fb-v1**: 1 preference pairs.") and "dataset fb-v1" in saved
    (pair,) = DatasetRegistry(home).load_preference("fb-v1")
    assert (pair.chosen, pair.rejected) == ("Ripple!", "[base] hello there")
    assert [(m.role, m.content) for m in pair.prompt] == [("system", "sys"), ("user", "Mascot?")]
    # Base wins the next two: r1 lost, and is the adapter to train further.
    for question in ("Again?", "Once more?"):
        *_, (right, left) = ui.send_chat(proc, question, right, left, "sys", settings, BASE, True, None, "r1")
        _, judged = ui.judge(home, "b", "", "fb", right, left, ("r1", BASE), "sys", judged)
    saved = ui.save_feedback(home, "fb")
    assert saved.startswith("Saved **fb-v2**: 3 preference pairs.") and "starting from run r1 (it lost)" in saved


def test_the_repetition_penalty_counts_the_reply_only():
    import torch

    kwargs = GenerationSettings(repetition_penalty=1.5).generate_kwargs(prompt_length=3)
    (penalty,) = kwargs["logits_processor"]
    assert "repetition_penalty" not in kwargs and kwargs["do_sample"] is False
    ids = torch.tensor([[5, 6, 7, 8]])  # prompt 5 6 7, reply so far 8
    scores = penalty(ids, torch.full((1, 10), 2.0))
    assert scores[0, 5].item() == 2.0 and scores[0, 8].item() == pytest.approx(2.0 / 1.5)  # echoing the prompt is free
    assert "logits_processor" not in GenerationSettings(repetition_penalty=1.0).generate_kwargs(prompt_length=3)


def test_a_conversation_may_end_with_a_tool_result_but_not_with_the_assistant():
    from studio.services.chatproc import check_messages, check_tools

    turns = [{"role": "user", "content": "Ferry?"}, {"role": "assistant", "content": "<tool_call>{}</tool_call>"}]
    assert check_messages([*turns, {"role": "tool", "content": "{}"}])[-1]["role"] == "tool"
    with pytest.raises(ChatError, match="must end with a user message"):
        check_messages(turns)
    with pytest.raises(ChatError, match="The tools are not usable: 'tools' is not valid JSON"):
        check_tools("[oops")


def test_labels_follow_the_drawn_sides_once_blind_is_turned_off():
    left, right, _ = ui.compare_updates(True, False, BASE, "r1", ("r1", BASE))
    assert (left.label, right.label) == ("Adapter r1", "Base model (no adapter)")  # what really answers
