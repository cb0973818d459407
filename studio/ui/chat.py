"""The Chat tab: a base model plus adapters from finished runs, streamed replies, compare with the base.

The model runs in a studio.services.chatproc.ChatProcess, ONE per server (per workspace), created lazily:
memory is what chat is short of, so every browser shares one loaded model instead of loading one each;
its lock queues concurrent requests (none is dropped), and every request names the adapter that answers,
so two users on different adapters never switch each other's answers. Conversations stay per browser
(in the Chatbot values). Unload ends that process for everyone, which is what gives its memory back.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio.core.config import QUANT_MODES
from studio.core.store import RunNotFound, RunStatus, Store
from studio.core.workspace import RunDir
from studio.data.errors import DataError, RowError
from studio.data.registry import DatasetRegistry
from studio.data.tools import CALL_RE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_tools
from studio.model.loading import BUNDLED, DTYPES
from studio.runs.preflight import same_model
from studio.services.chat import BASE, GenerationSettings
from studio.services.chatproc import ChatError, ChatProcess
from studio.services.feedback import FeedbackLog, Judgement, Verdict, save_version, tally
from studio.ui.common import UIContext, error_message

History = list[dict]


class ChatUIError(Exception):
    """Widget values the chat cannot use; `problems` lists each, as error_message shows them."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


# -- the shared chat process ------------------------------------------------------------------------

_PROCESSES: dict[Path, ChatProcess] = {}
_PROCESSES_LOCK = threading.Lock()


def chat_process(home: Path) -> ChatProcess:
    """The server's ChatProcess for a workspace, made on first use (no child starts until Load)."""
    with _PROCESSES_LOCK:
        proc = _PROCESSES.get(Path(home))
        if proc is None:
            proc = _PROCESSES[Path(home)] = ChatProcess(home=Path(home))
        return proc


# -- pure callbacks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunAdapter:
    run_id: str
    path: str
    base_source: str  # the base model the run trained on


def adapter_choices(store: Store) -> list[tuple[str, str]]:
    """(label, run id) for every completed run whose adapter is on disk, newest first."""
    return [
        (f"{run.name} ({run.id})", run.id)
        for run in store.list_runs(RunStatus.COMPLETED)
        if RunDir.is_adapter(run.adapter_dir)
    ]


def run_adapter(store: Store, run_id: str) -> RunAdapter:
    """The adapter of a run, or ChatUIError saying why that run cannot be chatted with."""
    try:
        run = store.get_run(run_id)
    except RunNotFound:
        raise ChatUIError(
            f"There is no run '{run_id}'. Pick one from the adapter list (it lists finished runs)."
        ) from None
    if run.status != RunStatus.COMPLETED:
        raise ChatUIError(
            f"Run '{run_id}' is {run.status.value}; only a completed run has a final adapter to chat with."
        )
    if not RunDir.is_adapter(run.adapter_dir):
        raise ChatUIError(f"Run '{run_id}' has no adapter on disk (looked in {run.adapter_dir}); was it deleted?")
    source = str((run.config.get("model") or {}).get("source") or BUNDLED)
    return RunAdapter(run.id, str(run.adapter_dir), source)


def settings_from_widgets(
    temperature: float, top_p: float, top_k: float, max_new_tokens: float, repetition_penalty: float
) -> GenerationSettings:
    """Slider and number values as GenerationSettings; ChatUIError lists every value out of range."""
    try:
        settings = GenerationSettings(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            repetition_penalty=float(repetition_penalty),
        )
    except (TypeError, ValueError):
        raise ChatUIError("Every generation setting needs a number.") from None
    problems = settings.validate()
    if problems:
        raise ChatUIError(problems)
    return settings


def text_of(content) -> str:
    """A Chatbot message's text: gradio 6 hands back a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


# A tool call in a reply is shown as a fenced block: the chat's markdown would hide a <tool_call> tag.
_CALL_FENCE = re.compile(r"```tool_call\n(.*?)\n```", re.DOTALL)
FEEDBACK_NAME = "chat-feedback"  # the dataset judgements go to unless the user names another
STUDIO_TOOLS = "studio-tools"  # the bundled sample whose schemas the Chat tab offers as an example


def shown_reply(text: str) -> str:
    return CALL_RE.sub(lambda m: f"```tool_call\n{m.group(1)}\n```", text)


def model_reply(text: str) -> str:
    """A shown reply as the model wrote it (what the next turn's prompt must contain)."""
    return _CALL_FENCE.sub(lambda m: f"{TOOL_CALL_OPEN}\n{m.group(1)}\n{TOOL_CALL_CLOSE}", text)


def tools_from_box(text: str | None) -> str | None:
    """The tools box: a JSON list of function schemas, or empty for none."""
    try:
        return parse_tools((text or "").strip() or None, "the tools box")
    except RowError as err:
        raise ChatUIError(str(err)) from None


def example_tools(home: Path) -> str:
    """The bundled studio-tools schemas, pretty-printed for the tools box."""
    try:
        tools = DatasetRegistry(home).load_examples(STUDIO_TOOLS)[0].tools
    except (DataError, IndexError) as err:
        raise gr.Error(f"The {STUDIO_TOOLS} sample cannot be read: {err}") from err
    return json.dumps([schema["function"] for schema in json.loads(tools or "[]")], indent=2, ensure_ascii=False)


def to_messages(history: History | None, system_prompt: str, message: str) -> list[dict[str, str]]:
    """The conversation the model answers: system prompt, earlier turns, the new user message."""
    messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt and system_prompt.strip() else []
    for turn in history or []:
        if turn.get("role") == "user":
            messages.append({"role": "user", "content": text_of(turn.get("content"))})
        elif turn.get("role") == "assistant":
            messages.append({"role": "assistant", "content": model_reply(text_of(turn.get("content")))})
    messages.append({"role": "user", "content": message})
    return messages


def plain_history(history: History | None) -> History:
    return [{"role": t["role"], "content": text_of(t.get("content"))} for t in history or [] if t.get("role")]


def with_reply(history: History | None, message: str, reply: str) -> History:
    """The history shown while a reply grows: earlier turns, the user's message, the reply so far."""
    shown = shown_reply(reply)
    return [*plain_history(history), {"role": "user", "content": message}, {"role": "assistant", "content": shown}]


def active_choices(loaded: dict[str, str] | list[str]) -> list[tuple[str, str]]:
    return [("base (no adapter)", BASE), *((name, name) for name in loaded)]


def status_markdown(info: dict, note: str = "") -> str:
    """What is loaded, the process id and its memory."""
    if not info.get("loaded"):
        text = "No chat model loaded. Choose a base model (and adapters), then press **Load**."
    else:
        adapters = ", ".join(f"`{a}`" for a in info.get("adapters") or {}) or "none"
        memory = f"{info['rss_mb']:,.0f} MB" if info.get("rss_mb") else "unknown"
        if info.get("cuda_mb"):
            memory += f" RAM, {info['cuda_mb']:,.0f} MB GPU"
        text = (
            f"**Loaded:** {info.get('name') or info.get('source')} ({info.get('dtype', '?')}"
            f"{'' if info.get('quant_mode', 'none') == 'none' else ', base in ' + info['quant_mode']})  \n"
            f"**Adapters:** {adapters}  \n"
            f"**Chat process:** pid {info.get('pid')}, memory {memory}"
        )
    return f"{text}\n\n{note}" if note else text


def local_status(proc: ChatProcess) -> dict:
    """The status from what the client knows, without waiting for the process's turn."""
    base = proc.base
    if base is None:
        return {"loaded": False}
    source, dtype, quant_mode = base
    return {
        "loaded": True,
        "name": source,
        "dtype": dtype,
        "quant_mode": quant_mode,
        "adapters": proc.loaded_adapters,
        "pid": proc.pid,
        "rss_mb": proc.memory_mb,
    }


def load_chat(
    proc: ChatProcess,
    store: Store,
    source: str,
    run_ids: list[str] | None,
    dtype: str = "fp32",
    quant_mode: str = "none",
) -> tuple[dict, str]:
    """Make the process hold `source` (in full precision, 8-bit or 4-bit) with exactly the chosen adapters.
    Returns (status, note). The base restarts only when it changes; adapters are added and removed to match.
    """
    source = (source or "").strip() or BUNDLED
    quant_mode = quant_mode or "none"
    if quant_mode not in QUANT_MODES:
        raise ChatUIError(f"Quantization must be one of {', '.join(QUANT_MODES)} (got {quant_mode!r}).")
    wanted = [run_adapter(store, run_id) for run_id in run_ids or []]  # refuse bad runs before loading anything
    if proc.base != (source, dtype, quant_mode):
        proc.start(source, dtype, quant_mode)
    for name in set(proc.loaded_adapters) - {a.run_id for a in wanted}:
        proc.remove_adapter(name)
    notes = []
    for adapter in wanted:
        if adapter.run_id not in proc.loaded_adapters:
            proc.add_adapter(adapter.run_id, adapter.path)
        if not same_model(adapter.base_source, source):
            notes.append(f"Note: run `{adapter.run_id}` was trained on `{adapter.base_source}`, not on `{source}`.")
    return proc.status(), "\n".join(notes)


def ensure_adapter(proc: ChatProcess, store: Store, adapter: str) -> None:
    """Load on demand what one request needs: the run's base if nothing is loaded, then its adapter."""
    adapter = (adapter or "").strip() or BASE
    run = None if adapter == BASE else run_adapter(store, adapter)
    if not proc.alive:
        proc.start(run.base_source if run else BUNDLED)
    if run and run.run_id not in proc.loaded_adapters:
        proc.add_adapter(run.run_id, run.path)


def answer(
    proc: ChatProcess,
    store: Store,
    message: str,
    adapter: str,
    system_prompt: str,
    max_new_tokens: int,
    tools: str = "",
) -> str:
    """One reply, loading what it needs: the `chat` API endpoint. tools: JSON function schemas, or empty."""
    if not (message or "").strip():
        raise ChatUIError("Type a message to send.")
    settings = GenerationSettings(max_new_tokens=int(max_new_tokens))
    problems = settings.validate()
    if problems:
        raise ChatUIError(problems)
    adapter = (adapter or "").strip() or BASE
    schemas = tools_from_box(tools)
    ensure_adapter(proc, store, adapter)
    return proc.reply(to_messages([], system_prompt, message), settings, adapter, schemas)


def send_chat(
    proc: ChatProcess,
    message: str,
    history: History | None,
    base_history: History | None,
    system_prompt: str,
    settings: GenerationSettings,
    active: str,
    compare: bool,
    tools: str | None = None,
    left: str = BASE,
) -> Iterator[tuple[History, History]]:
    """Stream the reply as growing histories (right side, left side). In compare mode the left model (the
    base unless told) answers first, then `active` on the right; each side keeps its own conversation."""
    active, left = active or BASE, left or BASE
    if not (message or "").strip():
        raise ChatUIError("Type a message to send.")
    if not proc.alive:
        raise ChatUIError("No chat model is loaded. Choose a base model (and adapters) and press Load.")
    if compare and active == left:
        raise ChatUIError(
            "Compare needs two different models: load an adapter and choose it under 'Answer with' (or "
            "another model under 'Compare with')."
        )
    history, base_history = plain_history(history), plain_history(base_history)
    if compare:
        shown = with_reply(base_history, message, "")
        yield with_reply(history, message, ""), shown  # both sides show the question before any answer
        for partial in proc.stream(to_messages(base_history, system_prompt, message), settings, left, tools):
            shown = with_reply(base_history, message, partial)
            yield with_reply(history, message, ""), shown
        base_history = shown
    shown = with_reply(history, message, "")
    yield shown, base_history
    for partial in proc.stream(to_messages(history, system_prompt, message), settings, active, tools):
        shown = with_reply(history, message, partial)
        yield shown, base_history


# -- what the tab's handlers show -------------------------------------------------------------------


def selection_updates(proc: ChatProcess, store: Store, chosen: list[str] | None, active_name: str) -> tuple:
    """On tab selection: the completed runs (dropping chosen ones that are gone), what answers (the base
    when the chosen adapter is no longer loaded) and the status."""
    choices = adapter_choices(store)
    ids = {value for _, value in choices}
    loaded = proc.loaded_adapters
    return (
        gr.Dropdown(choices=choices, value=[c for c in chosen or [] if c in ids]),
        gr.Dropdown(choices=active_choices(loaded), value=active_name if active_name in loaded else BASE),
        status_markdown(local_status(proc)),
    )


def load_updates(proc: ChatProcess, store: Store, source: str, run_ids, dtype_name: str, quant_mode: str) -> tuple:
    """Load: the status (or what is wrong) and 'Answer with', set to the newest loaded adapter."""
    try:
        info, note = load_chat(proc, store, source, run_ids, dtype_name, quant_mode)
    except (ChatError, ChatUIError) as err:
        return error_message(err), gr.Dropdown(choices=active_choices(proc.loaded_adapters), value=BASE)
    loaded = list(proc.loaded_adapters)
    return status_markdown(info, note), gr.Dropdown(
        choices=active_choices(loaded), value=loaded[-1] if loaded else BASE
    )


def unload_updates(proc: ChatProcess) -> tuple:
    proc.unload()
    note = "Unloaded: the chat process ended and its memory was given back."
    return status_markdown({"loaded": False}, note), gr.Dropdown(choices=active_choices([]), value=BASE)


def send_updates(
    proc: ChatProcess,
    msg,
    history,
    base_history,
    system_prompt,
    widgets,
    active_name,
    compare_on,
    tools_text="",
    left: str = BASE,
):
    """Send: (chat, base chat, input box, status) as the reply streams. widgets: the generation sliders
    (temperature, top-p, top-k, max new tokens, repetition penalty); tools_text: the tools box; left: the
    model on the left in compare mode."""
    answered = False
    try:
        settings = settings_from_widgets(*widgets)
        tools = tools_from_box(tools_text)
        for shown, base_shown in send_chat(
            proc, msg, history, base_history, system_prompt, settings, active_name, compare_on, tools, left
        ):
            history, base_history, answered = shown, base_shown, True
            yield shown, base_shown, "", gr.skip()
    except (ChatError, ChatUIError) as err:
        # Keep what was typed when nothing was answered, so the user can send it again.
        yield history, base_history, "" if answered else gr.skip(), error_message(err)
        return
    yield gr.skip(), gr.skip(), gr.skip(), status_markdown(local_status(proc))


def compare_updates(on: bool, blind: bool = False, left: str = BASE, right: str = BASE, sides=None) -> tuple:
    """The left chat, the right chat's label and the judging panel, for compare mode on or off. Blind, the
    sides are A and B, in an order drawn per conversation (draw_sides); not blind, the models that answer:
    the conversation's sides once drawn, else 'Compare with' on the left and 'Answer with' on the right."""
    if not on:
        return gr.Chatbot(visible=False), gr.Chatbot(label="Chat"), gr.Column(visible=False)
    left, right = sides or (left, right)
    labels = ("Answer A", "Answer B") if blind else (model_label(left), model_label(right))
    return gr.Chatbot(visible=True, label=labels[0]), gr.Chatbot(label=labels[1]), gr.Column(visible=True)


def model_label(model: str) -> str:
    return "Base model (no adapter)" if model == BASE else f"Adapter {model}"


def draw_sides(
    history, base_history, sides, compare_with: str, active: str, blind: bool, rng: random.Random | None = None
) -> tuple[str, str]:
    """(left model, right model) of a compare conversation: drawn when it starts (in random order when
    blind, so the user cannot tell A from B), then kept until Clear."""
    if sides and (history or base_history):
        return tuple(sides)
    pair = [compare_with or BASE, active or BASE]
    if blind:
        (rng or random).shuffle(pair)
    return pair[0], pair[1]


def judge(
    home: Path,
    verdict: str,
    edited: str,
    name: str,
    history: History | None,
    base_history: History | None,
    sides,
    system_prompt: str,
    judged_at: int | None,
) -> tuple[str, int]:
    """Keep a judgement of the last two answers (A: left, B: right) under `name`; (what to show, the
    length of the conversation judged, so the same answers are not judged twice)."""
    left_side, right_side = plain_history(base_history), plain_history(history)
    if len(right_side) < 2 or len(left_side) < 2 or not sides:
        raise ChatUIError("Nothing to judge yet: turn compare on and send a message, then mark the better answer.")
    if judged_at == len(right_side):
        raise ChatUIError("These answers are judged already. Send the next message to judge again.")
    a_text, b_text = left_side[-1]["content"], right_side[-1]["content"]
    if not a_text.strip() or not b_text.strip():
        raise ChatUIError("Wait until both answers are complete, then judge them.")
    verdict = Verdict(verdict)
    winner_side = right_side if verdict == Verdict.B else left_side  # the context the chosen answer replied to
    prompt = to_messages(winner_side[:-2], system_prompt, winner_side[-2]["content"])
    judgement = Judgement(prompt, sides[0], sides[1], model_reply(a_text), model_reply(b_text), verdict, edited or "")
    log = FeedbackLog(home, (name or "").strip() or FEEDBACK_NAME)
    log.add(judgement)
    shown = {Verdict.A: "A is better", Verdict.B: "B is better", Verdict.TIE: "a tie"}[verdict]
    reveal = f"Judged {shown}: A was {model_label(sides[0]).lower()}, B was {model_label(sides[1]).lower()}."
    return reveal + "\n\n" + tally_markdown(log), len(right_side)


def tally_markdown(log: FeedbackLog) -> str:
    judgements = log.judgements()
    lines = [f"**{log.name}**: {len(judgements)} judged, {len(log.pairs())} preference pairs."]
    for t in tally(judgements):
        a, b = model_label(t.a_model), model_label(t.b_model)
        rate = 100 * t.win_rate(t.b_model)
        lines.append(f"- {a} vs {b}: {t.a_wins} : {t.b_wins}, {t.ties} ties (win rate {rate:.0f}% for {b})")
    return "\n".join(lines)


def save_feedback(home: Path, name: str) -> str:
    """Register the pairs so far as the next dataset version, and say how to train on it."""
    log = FeedbackLog(home, (name or "").strip() or FEEDBACK_NAME)
    entry = save_version(DatasetRegistry(home), log)
    losers = {t.a_model if t.win_rate(t.a_model) < 0.5 else t.b_model for t in tally(log.judgements())} - {BASE}
    start = f", starting from run {sorted(losers)[0]} (it lost)" if losers else ""
    return (
        f"Saved **{entry.name}**: {entry.rows} preference pairs. Train on it in the Train tab: stage dpo, "
        f"dataset {entry.name}{start}."
    )


# -- layout and wiring ------------------------------------------------------------------------------


def _model_controls(store: Store, proc: ChatProcess, chat_status) -> SimpleNamespace:
    """The left column: the base model, its compute type and quantization, the adapters, Load / Unload,
    the status, what answers, compare, the system prompt and the generation settings."""
    model = gr.Textbox(
        BUNDLED, label="Base model", info="bundled, a local model folder, or a hub id", elem_id="chat-model"
    )
    dtype = gr.Dropdown(list(DTYPES), value="fp32", label="Compute type", elem_id="chat-dtype")
    quant = gr.Dropdown(
        list(QUANT_MODES),
        value="none",
        label="Quantization",
        info="4bit/8bit: less memory, slower on CPU; adapters from any run load on it",
        elem_id="chat-quant",
    )
    adapters = gr.Dropdown(
        choices=adapter_choices(store),  # refreshed whenever the tab is selected
        value=[],
        multiselect=True,
        allow_custom_value=True,  # API callers may name a run that finished after the page was built
        label="Adapters (completed runs)",
        elem_id="chat-adapter",
    )
    with gr.Row():
        load = gr.Button("Load", variant="primary", elem_id="chat-load")
        unload = gr.Button("Unload", elem_id="chat-unload")
    # The process is shared by the server: a reloaded page shows what is loaded already.
    status = gr.Markdown(chat_status, elem_id="chat-status")
    active = gr.Dropdown(
        choices=active_choices(proc.loaded_adapters), value=BASE, label="Answer with", elem_id="chat-active"
    )
    compare = gr.Checkbox(False, label="Compare two models, side by side", elem_id="chat-compare")
    with gr.Row():
        compare_with = gr.Dropdown(
            choices=active_choices(proc.loaded_adapters), value=BASE, label="Compare with", elem_id="chat-compare-with"
        )
        blind = gr.Checkbox(True, label="Blind: answers as A and B, in random order", elem_id="chat-blind")
    system = gr.Textbox(label="System prompt", lines=3, elem_id="chat-system")
    with gr.Accordion("Tools (function calling)", open=False):
        tools = gr.Code(
            "",
            language="json",
            label="Tool schemas: a JSON list of {name, description, parameters}; sent with every message",
            lines=6,
            elem_id="chat-tools",
        )
        tools_example = gr.Button("Use the studio-tools schemas", size="sm", elem_id="chat-tools-example")
    sliders = _generation_sliders()
    return SimpleNamespace(**{k: v for k, v in locals().items() if k not in ("store", "proc", "chat_status")})


def _generation_sliders() -> list[gr.Slider]:
    """Temperature, top-p, top-k, max new tokens and repetition penalty, in settings_from_widgets' order."""
    defaults = GenerationSettings()
    with gr.Accordion("Generation settings", open=False):
        return [
            gr.Slider(
                0,
                2,
                value=defaults.temperature,
                step=0.05,
                label="Temperature (0 = greedy)",
                elem_id="chat-temperature",
            ),
            gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p", elem_id="chat-top-p"),
            gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k (0 = off)", elem_id="chat-top-k"),
            gr.Slider(
                1, 2048, value=defaults.max_new_tokens, step=1, label="Max new tokens", elem_id="chat-max-new-tokens"
            ),
            gr.Slider(
                0.5,
                3,
                value=defaults.repetition_penalty,
                step=0.05,
                label="Repetition penalty",
                elem_id="chat-repetition-penalty",
            ),
        ]


def _conversation() -> SimpleNamespace:
    """The right column: the chat (and the base's, shown in compare mode), the input box, Send and Clear."""
    with gr.Row():
        base_bot = gr.Chatbot(label="Base model (no adapter)", elem_id="chatbot-base", visible=False)
        bot = gr.Chatbot(label="Chat", elem_id="chatbot")
    message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, lines=2, elem_id="chat-input")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="chat-send")
        clear = gr.Button("Clear", elem_id="chat-clear")
    with gr.Column(visible=False, elem_id="chat-judge") as judge_panel:
        with gr.Row():
            vote_a = gr.Button("A is better", elem_id="chat-vote-a")
            vote_tie = gr.Button("Tie", elem_id="chat-vote-tie")
            vote_b = gr.Button("B is better", elem_id="chat-vote-b")
        edited = gr.Textbox(
            label="The answer you wanted (optional): it becomes the chosen answer instead of the better one",
            lines=2,
            elem_id="chat-vote-edit",
        )
        with gr.Row():
            feedback_name = gr.Textbox(FEEDBACK_NAME, label="Feedback dataset", elem_id="chat-feedback-name")
            save_judged = gr.Button("Save the pairs as a new dataset version", elem_id="chat-feedback-save")
        verdicts = gr.Markdown(elem_id="chat-feedback-tally")
    sides = gr.State(None)  # (left model, right model) of the compare conversation
    judged_at = gr.State(None)
    return SimpleNamespace(**locals())


def _wire(ctx: UIContext, tab, side: SimpleNamespace, talk: SimpleNamespace) -> None:
    def store() -> Store:
        return ctx.jobs.store

    def proc() -> ChatProcess:
        return chat_process(ctx.home)

    def on_select(chosen: list[str] | None, active_name: str):
        return selection_updates(proc(), store(), chosen, active_name)

    def on_load(source: str, run_ids: list[str] | None, dtype_name: str, quant_mode: str = "none"):
        return load_updates(proc(), store(), source, run_ids, dtype_name, quant_mode)

    def on_unload():
        return unload_updates(proc())

    def on_send(*values):
        msg, history, base_history, system_prompt, temp, p, k, max_tokens, rep, active_name, compare_on = values[:11]
        tools, compare_with, blind_on, sides = values[11:]
        widgets = (temp, p, k, max_tokens, rep)
        left, right = draw_sides(history, base_history, sides, compare_with, active_name, blind_on)
        if not compare_on:
            left, right = BASE, active_name
        talk_args = (proc(), msg, history, base_history, system_prompt, widgets, right, compare_on, tools, left)
        for update in send_updates(*talk_args):
            yield *update, (left, right)

    def on_judge(verdict: str):
        def handler(edited, name, history, base_history, sides, system_prompt, judged):
            try:
                shown, judged = judge(
                    ctx.home, verdict, edited, name, history, base_history, sides, system_prompt, judged
                )
            except (ChatUIError, DataError) as err:
                return error_message(err), gr.skip(), judged
            return shown, "", judged

        return handler

    def on_save(name):
        try:
            return save_feedback(ctx.home, name)
        except DataError as err:
            return error_message(err)

    def chat(
        message: str, adapter: str = BASE, system_prompt: str = "", max_new_tokens: int = 128, tools: str = ""
    ) -> str:
        """Answer one message with a completed run's adapter (its run id) or "base", loading on demand.
        tools: a JSON list of function schemas the model may call (answers then hold <tool_call> JSON)."""
        try:
            return answer(proc(), store(), message, adapter, system_prompt, max_new_tokens, tools)
        except (ChatError, ChatUIError) as err:
            raise gr.Error(str(err)) from err

    tab.select(on_select, [side.adapters, side.active], [side.adapters, side.active, side.status], api_name=False)
    # quant comes last, so API callers that pass (model, adapters, dtype) keep working.
    load_inputs = [side.model, side.adapters, side.dtype, side.quant]

    def compare_choices(chosen: str):
        loaded = proc().loaded_adapters
        return gr.Dropdown(choices=active_choices(loaded), value=chosen if chosen in loaded else BASE)

    loaded = side.load.click(on_load, load_inputs, [side.status, side.active], api_name="chat_load")
    loaded.then(compare_choices, side.compare_with, side.compare_with, api_name=False)
    unloaded = side.unload.click(on_unload, None, [side.status, side.active], api_name="chat_unload")
    unloaded.then(compare_choices, side.compare_with, side.compare_with, api_name=False)
    inputs = [talk.message, talk.bot, talk.base_bot, side.system, *side.sliders, side.active, side.compare, side.tools]
    inputs += [side.compare_with, side.blind, talk.sides]
    outputs = [talk.bot, talk.base_bot, talk.message, side.status, talk.sides]
    talk.send.click(on_send, inputs, outputs, api_name=False)
    talk.message.submit(on_send, inputs, outputs, api_name=False)
    talk.clear.click(lambda: ([], [], None), None, [talk.bot, talk.base_bot, talk.sides], api_name=False)
    view = [side.compare, side.blind, side.compare_with, side.active]
    for control in view:
        control.change(
            compare_updates, [*view, talk.sides], [talk.base_bot, talk.bot, talk.judge_panel], api_name=False
        )
    judge_inputs = [talk.edited, talk.feedback_name, talk.bot, talk.base_bot, talk.sides, side.system, talk.judged_at]
    for button, verdict in ((talk.vote_a, Verdict.A), (talk.vote_b, Verdict.B), (talk.vote_tie, Verdict.TIE)):
        button.click(on_judge(verdict), judge_inputs, [talk.verdicts, talk.edited, talk.judged_at], api_name=False)
    talk.save_judged.click(on_save, talk.feedback_name, talk.verdicts, api_name=False)
    side.tools_example.click(lambda: example_tools(ctx.home), None, side.tools, api_name=False)
    gr.api(chat, api_name="chat")


def build(ctx: UIContext, tab) -> None:
    def chat_status() -> str:  # a callable value: evaluated on every page load (endpoint /chat_status)
        return status_markdown(local_status(chat_process(ctx.home)))

    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            side = _model_controls(ctx.jobs.store, chat_process(ctx.home), chat_status)
        with gr.Column(scale=3):
            talk = _conversation()
    _wire(ctx, tab, side, talk)
