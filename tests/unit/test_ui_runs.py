"""The Runs tab's callbacks, and both tabs building inside gr.Blocks, against a temporary workspace."""

from __future__ import annotations

import os

import pytest

from studio.core.presets import load_preset
from studio.core.procs import process_start_token
from studio.core.store import RunStatus
from studio.core.workspace import RunDir
from studio.ui import runs as R
from studio.ui import train as T
from studio.ui.common import UIContext


@pytest.fixture
def ctx(home, monkeypatch) -> UIContext:
    monkeypatch.setenv("STUDIO_SLOTS", "0")  # submit queues, no worker starts
    return UIContext(home)


def submit(ctx: UIContext, name: str, r: int = 16) -> str:
    cfg = load_preset("quick-demo")
    cfg.name, cfg.lora.r = name, r
    return ctx.jobs.submit(cfg).id


def finish(ctx: UIContext, run_id: str, losses: list[float]) -> None:
    store = ctx.jobs.store
    store.transition(run_id, RunStatus.RUNNING, pid=os.getpid(), pid_started=process_start_token(os.getpid()))
    for step, loss in enumerate(losses, 1):
        store.log_metrics(run_id, step, loss=loss)
    store.update_run(run_id, total_steps=len(losses))
    store.transition(run_id, RunStatus.COMPLETED)


def test_runs_table_columns_and_values(ctx):
    run_id = submit(ctx, "table", r=8)
    finish(ctx, run_id, [2.0, 1.5, 1.23456])
    frame = R.runs_frame(ctx.jobs.store.list_runs())
    assert list(frame.columns) == [
        "id", "name", "status", "dataset", "model", "r", "alpha", "lr", "steps", "final loss", "duration", "created",
    ]  # fmt: skip
    row = frame.iloc[0]
    assert (row["id"], row["status"], row["dataset"], row["model"]) == (run_id, "completed", "studio-facts", "bundled")
    assert (row["r"], row["alpha"], row["lr"], row["steps"]) == (8, 32.0, 0.0005, "3/3")
    assert row["final loss"] == pytest.approx(1.2346)
    assert row["duration"] and row["created"]


def test_overlay_has_one_trace_per_selected_run(ctx):
    a, b, c = submit(ctx, "a"), submit(ctx, "b"), submit(ctx, "c")
    finish(ctx, a, [3.0, 2.0])
    finish(ctx, b, [3.0, 1.0, 0.5])
    fig = R.overlay(ctx, [a, b, "deleted-meanwhile"])
    assert len(fig.data) == 2
    assert [len(t.x) for t in fig.data] == [2, 3]
    assert R.overlay(ctx, []).data == ()
    assert len(R.overlay(ctx, [a, b, c]).data) == 3


def test_config_and_log_of_a_run(ctx):
    run_id = submit(ctx, "cfg")
    text = R.run_config_yaml(ctx, run_id)
    assert text.startswith("# studio train ") and (ctx.jobs.run_dir(run_id) / "config.yaml").read_text() in text
    RunDir(ctx.jobs.run_dir(run_id)).log.write_text("one\ntwo\n")
    assert R.run_log(ctx, run_id) == "one\ntwo"
    assert R.run_config_yaml(ctx, None) == "" and R.run_log(ctx, None) == ""


def test_delete_refuses_a_running_run_and_deletes_finished_ones(ctx):
    running, done = submit(ctx, "running"), submit(ctx, "done")
    ctx.jobs.store.transition(running, RunStatus.RUNNING, pid=os.getpid(), pid_started=process_start_token(os.getpid()))
    finish(ctx, done, [1.0])
    message = R.delete_runs(ctx, [running, done])
    assert f"Deleted `{done}`" in message and "abort it before deleting" in message
    assert [r.id for r in ctx.jobs.store.list_runs()] == [running]
    assert not ctx.jobs.run_dir(done).exists() and ctx.jobs.run_dir(running).exists()
    assert "Select" in R.delete_runs(ctx, [])


def test_refresh_updates_choices_only_when_runs_change(ctx):
    a = submit(ctx, "a")
    frame, choices, kept, ids = R.refresh(ctx, ["gone", a], None)
    assert choices == [a] and kept == [a] and ids == [a] and len(frame) == 1
    _, choices, kept, _ = R.refresh(ctx, [a], ids)
    assert choices is None and kept is None
    assert R.toggle_selection([a], a) == [] and R.toggle_selection([], a) == [a]


def test_list_runs_is_json_able(ctx):
    import json

    submit(ctx, "json")
    runs = R.list_runs(ctx)
    assert json.loads(json.dumps(runs))[0]["status"] == "queued"


def test_both_tabs_build_inside_blocks(ctx):
    import gradio as gr

    with gr.Blocks() as demo:
        with gr.Tab("Train") as train_tab:
            T.build(ctx, train_tab)
        with gr.Tab("Runs") as runs_tab:
            R.build(ctx, runs_tab)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    expected = set(T.ELEM_IDS.values()) | {
        "train-preset", "train-params", "train-command", "preset-save-name", "preset-save", "train-start",
        "train-abort", "train-resume", "train-run", "train-status", "train-progress", "loss-plot", "lr-plot",
        "gradnorm-plot", "speed-plot", "memory-plot", "train-log", "train-message",
        "runs-table", "runs-select", "runs-overlay", "runs-config", "runs-log", "runs-delete", "runs-refresh",
    }  # fmt: skip
    assert expected <= ids
    api_names = {d.api_name for d in demo.fns.values()}
    assert {"start_training", "run_status", "abort_run", "resume_run", "list_runs", "start_preset_run"} <= api_names
