"""The Runs tab: every run in the store (from this page, other tabs or the CLI), compared and inspected.

Callbacks are module-level functions of a UIContext and plain values; `build` only wires them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gradio as gr
import pandas as pd
import yaml

from studio.jobs import CONFIG_FILE, JobError
from studio.store import Run, RunNotFound, iso
from studio.ui import charts
from studio.ui.common import UIContext, error_message
from studio.ui.train import format_duration

COLUMNS = ["id", "name", "status", "dataset", "model", "r", "alpha", "lr", "steps", "final loss", "duration", "created"]


def _section(run: Run, name: str) -> dict:
    value = run.config.get(name)
    return value if isinstance(value, dict) else {}


def run_row(run: Run) -> dict:
    """One table row; hyperparameters come from the run's stored config, so CLI runs show the same."""
    lora, train = _section(run, "lora"), _section(run, "train")
    return {
        "id": run.id,
        "name": run.name,
        "status": run.status.value,
        "dataset": run.datasets,
        "model": run.model,
        "r": lora.get("r"),
        "alpha": lora.get("alpha"),
        "lr": train.get("learning_rate"),
        "steps": f"{run.step}/{run.total_steps}" if run.total_steps else str(run.step),
        "final loss": None if run.final_loss is None else round(run.final_loss, 4),
        "duration": format_duration(run.duration_s) if run.started_at else "",
        "created": iso(run.created_at),
    }


def runs_frame(runs: Sequence[Run]) -> pd.DataFrame:
    return pd.DataFrame([run_row(r) for r in runs], columns=COLUMNS)


def list_runs(ctx: UIContext) -> list[dict]:
    """Every run as a JSON-able dict, newest first (for API callers)."""
    ctx.jobs.reconcile()
    return [r.to_dict() for r in ctx.jobs.store.list_runs()]


def overlay(ctx: UIContext, run_ids: Sequence[str] | None):
    """Loss curves of the selected runs on one chart; runs deleted meanwhile are skipped."""
    store = ctx.jobs.store
    curves = {}
    for run_id in run_ids or []:
        try:
            run = store.get_run(run_id)
        except RunNotFound:
            continue
        curves[f"{run.name} ({run.id[-4:]})" if run.name != run.id else run.id] = store.metrics(run_id)
    return charts.overlay_figure(curves)


def run_config_yaml(ctx: UIContext, run_id: str | None) -> str:
    """The run's config.yaml as written at submit time (what `studio train` repeats)."""
    if not run_id:
        return ""
    try:
        run = ctx.jobs.store.get_run(run_id)
    except RunNotFound as err:
        return f"# {err}"
    path = Path(run.run_dir) / CONFIG_FILE
    if path.is_file():
        return f"# studio train {path}\n" + path.read_text()
    return yaml.safe_dump(run.config, sort_keys=False)


def run_log(ctx: UIContext, run_id: str | None, lines: int = 200) -> str:
    return ctx.jobs.log_tail(run_id, lines) if run_id else ""


def delete_runs(ctx: UIContext, run_ids: Sequence[str] | None) -> str:
    """Delete finished runs; a queued or running one is refused with the reason (abort it first)."""
    if not run_ids:
        return "Select the runs to delete first."
    done, problems = [], []
    for run_id in run_ids:
        try:
            ctx.jobs.delete(run_id)
            done.append(run_id)
        except (JobError, RunNotFound) as err:
            problems.append(str(err))
    parts = [f"Deleted {', '.join(f'`{r}`' for r in done)}."] if done else []
    if problems:
        parts.append(error_message(JobError(" ".join(problems))))
    return "\n\n".join(parts)


def refresh(ctx: UIContext, selected: Sequence[str] | None, last_ids: Sequence[str] | None = None) -> tuple:
    """The table, and the selection's choices only when the set of runs changed (so an open dropdown
    is not reset every tick). Returns (frame, choices or None, kept selection or None, ids)."""
    ctx.jobs.reconcile()
    runs = ctx.jobs.store.list_runs()
    ids = [r.id for r in runs]
    if list(last_ids or []) == ids:
        return runs_frame(runs), None, None, ids
    kept = [r for r in selected or [] if r in ids]
    return runs_frame(runs), ids, kept, ids


def toggle_selection(selected: Sequence[str] | None, run_id: str) -> list[str]:
    """Clicking a table row adds its run to the selection, or removes it when already there."""
    selected = list(selected or [])
    return [r for r in selected if r != run_id] if run_id in selected else [*selected, run_id]


def build(ctx: UIContext, tab: gr.Tab | None = None) -> None:
    runs = ctx.jobs.store.list_runs()
    table = gr.Dataframe(runs_frame(runs), label="Runs", interactive=False, elem_id="runs-table")
    with gr.Row():
        select = gr.Dropdown(
            [r.id for r in runs], value=[], multiselect=True, label="Selected runs", elem_id="runs-select", scale=4
        )
        refresh_btn = gr.Button("Refresh", elem_id="runs-refresh", scale=1)
        delete_btn = gr.Button("Delete selected", variant="stop", elem_id="runs-delete", scale=1)
    message = gr.Markdown(elem_id="runs-message")
    plot = gr.Plot(charts.overlay_figure({}), label="Loss by run", elem_id="runs-overlay")
    with gr.Row():
        config = gr.Code(language="yaml", label="Config (last selected run)", elem_id="runs-config")
        log = gr.Textbox(label="Log (last selected run)", lines=16, max_lines=16, elem_id="runs-log")
    known = gr.State([])

    def do_refresh(selected, last):
        frame, choices, kept, ids = refresh(ctx, selected, last)
        update = gr.skip() if choices is None else gr.update(choices=choices, value=kept)
        return frame, update, ids

    def show(selected):
        last = selected[-1] if selected else None
        return overlay(ctx, selected), run_config_yaml(ctx, last), run_log(ctx, last)

    def on_row(selected, evt: gr.SelectData):
        row = evt.row_value or []
        return toggle_selection(selected, row[0]) if row else gr.skip()

    refresh_outputs = [table, select, known]
    refresh_btn.click(do_refresh, [select, gr.State(None)], refresh_outputs, api_name=False)
    gr.Timer(3.0).tick(do_refresh, [select, known], refresh_outputs, api_name=False, show_progress="hidden")
    select.change(show, select, [plot, config, log], api_name=False)
    table.select(on_row, select, select, api_name=False)
    delete_btn.click(lambda ids: delete_runs(ctx, ids), select, message, api_name="delete_runs").then(
        do_refresh, [select, gr.State(None)], refresh_outputs, api_name=False
    )

    def api_list_runs() -> list[dict]:
        return list_runs(ctx)

    gr.api(api_list_runs, api_name="list_runs")
    if tab is not None:
        tab.select(do_refresh, [select, gr.State(None)], refresh_outputs, api_name=False)
