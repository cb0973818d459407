"""The Runs tab: every run in the store (from this page, other tabs or the CLI), compared and inspected.

Callbacks are module-level functions of a UIContext and plain values; `build` only wires them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import SimpleNamespace

import gradio as gr
import pandas as pd
import yaml

from studio.core.store import Run, RunNotFound, RunStatus, iso
from studio.core.workspace import RunDir
from studio.runs.queue import JobError
from studio.ui import charts
from studio.ui.common import UIContext, coach_markdown, error_message
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
    path = RunDir.of(run).config
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


# -- sweeps: a group of short scan runs, compared, with a pick ------------------------------------

SWEEP_COLUMNS = ["pick", "run", "values", "status", "train loss", "eval loss", "trainable", "time", "peak MiB"]


def sweep_choices(ctx: UIContext) -> list[tuple[str, str]]:
    """(label, id) per sweep, newest first."""
    out = []
    for sweep in ctx.jobs.store.list_sweeps():
        params = ", ".join(f"{p['path']}={','.join(str(v) for v in p['values'])}" for p in sweep.params)
        out.append((f"{sweep.name} · {params} · {iso(sweep.created_at)}", sweep.id))
    return out


def _fmt(value, digits: int = 4):
    return None if value is None else round(value, digits)


def sweep_frame(rows, pick) -> pd.DataFrame:
    data = [
        {
            "pick": "★" if pick is not None and row.run_id == pick.run_id else "",
            "run": row.run_id,
            "values": ", ".join(f"{k}={v}" for k, v in row.values.items()),
            "status": row.status,
            "train loss": _fmt(row.final_train_loss),
            "eval loss": _fmt(row.final_eval_loss),
            "trainable": None if row.trainable_params is None else f"{row.trainable_params:,}",
            "time": format_duration(row.seconds) if row.seconds is not None else "",
            "peak MiB": None if row.peak_memory_mb is None else round(row.peak_memory_mb),
        }
        for row in rows
    ]
    return pd.DataFrame(data, columns=SWEEP_COLUMNS)


def pick_markdown(sweep, rows, pick) -> str:
    done = sum(1 for r in rows if r.status == RunStatus.COMPLETED)
    head = f"**Sweep `{sweep.id}`**: {done} of {len(rows)} scan runs completed ({sweep.scan_steps} steps each)."
    if sweep.long_run_id:
        head += f" Long run started from the pick: `{sweep.long_run_id}`."
    if pick is None:
        return head + "\n\nNo pick yet: it appears when a scan run completes."
    values = ", ".join(f"`{k}={v}`" for k, v in pick.values.items())
    return f"{head}\n\n**Recommended pick:** {values} (run `{pick.run_id}`). {pick.reason}"


def sweep_view(ctx: UIContext, sweep_id: str | None) -> tuple:
    """(figure, table, pick text) for one sweep, read from the store."""
    if not sweep_id:
        return charts.sweep_figure({}), sweep_frame([], None), "Pick a sweep to compare its runs."
    try:
        sweep, rows, pick = ctx.jobs.sweep_summary(sweep_id)
    except (KeyError, ValueError, JobError) as err:
        return charts.sweep_figure({}), sweep_frame([], None), error_message(err)
    store = ctx.jobs.store
    labels = {r.run_id: ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r.values.items()) for r in rows}
    curves = {labels[r.run_id]: store.metrics(r.run_id) for r in rows}
    return charts.sweep_figure(curves), sweep_frame(rows, pick), pick_markdown(sweep, rows, pick)


def sweep_active(ctx: UIContext, sweep_id: str | None) -> bool:
    """Whether any run of the sweep (its long run included) is still queued or running."""
    if not sweep_id:
        return False
    try:
        runs = ctx.jobs.store.runs_of_sweep(sweep_id)
    except (KeyError, ValueError):
        return False
    return any(not r.status.finished for r in runs)


def promote_sweep(ctx: UIContext, sweep_id: str | None) -> str:
    """Queue the long run from the sweep's pick (the base config's own length, the pick's values)."""
    if not sweep_id:
        return "Pick a sweep first."
    try:
        run = ctx.jobs.promote_sweep(sweep_id)
    except (KeyError, ValueError, JobError) as err:
        return error_message(err)
    return f"Long run `{run.id}` queued from the pick. Watch it in the Train tab."


# -- run cards and the coach for the selected run --------------------------------------------------


def write_run_card(ctx: UIContext, run_id: str | None) -> tuple[str, str | None]:
    """Write the run's Markdown card next to its adapter; (markdown shown in the page, file to download)."""
    if not run_id:
        return "Select a run first.", None
    from studio.reports.card import CardError, write_card

    try:
        path = write_card(ctx.home, run_id)
    except (CardError, RunNotFound) as err:
        return error_message(err), None
    return path.read_text(), str(path)


def run_coach(ctx: UIContext, run_id: str | None) -> str:
    if not run_id:
        return ""
    from studio.training.coach import advice_for_run

    try:
        run = ctx.jobs.store.get_run(run_id)
    except RunNotFound as err:
        return error_message(err)
    return coach_markdown(advice_for_run(ctx.jobs.store, run))


def _runs_list(runs: Sequence[Run]) -> SimpleNamespace:
    """The runs table, the selection with Refresh and Delete, the message, the loss overlay and the coach."""
    table = gr.Dataframe(runs_frame(runs), label="Runs", interactive=False, elem_id="runs-table")
    with gr.Row():
        select = gr.Dropdown(
            [r.id for r in runs], value=[], multiselect=True, label="Selected runs", elem_id="runs-select", scale=4
        )
        refresh_btn = gr.Button("Refresh", elem_id="runs-refresh", scale=1)
        delete_btn = gr.Button("Delete selected", variant="stop", elem_id="runs-delete", scale=1)
    message = gr.Markdown(elem_id="runs-message")
    plot = gr.Plot(charts.overlay_figure({}), label="Loss by run", elem_id="runs-overlay")
    coach = gr.Markdown(elem_id="runs-coach")
    return SimpleNamespace(**{k: v for k, v in locals().items() if k != "runs"})


def _run_details(page: SimpleNamespace) -> None:
    """The last selected run's config, log and run card."""
    with gr.Row():
        page.config = gr.Code(language="yaml", label="Config (last selected run)", elem_id="runs-config")
        page.log = gr.Textbox(label="Log (last selected run)", lines=16, max_lines=16, elem_id="runs-log")
    with gr.Row():
        page.card_btn = gr.Button("Write run card (last selected run)", elem_id="runs-card", scale=1)
        page.card_file = gr.File(label="Run card", elem_id="runs-card-file", interactive=False, scale=2)
    page.card_text = gr.Markdown(elem_id="runs-card-text")
    page.known = gr.State([])


def _sweeps_panel(ctx: UIContext, page: SimpleNamespace) -> None:
    with gr.Accordion("Sweeps", open=True):
        with gr.Row():
            page.sweep = gr.Dropdown(
                sweep_choices(ctx), value=None, label="Sweep", elem_id="sweep-select", scale=4, allow_custom_value=True
            )
            page.sweep_refresh = gr.Button("Refresh", elem_id="sweep-refresh", scale=1)
            page.promote = gr.Button("Start long run from pick", variant="primary", elem_id="sweep-promote", scale=1)
        page.sweep_pick = gr.Markdown(elem_id="sweep-pick")
        page.sweep_table = gr.Dataframe(sweep_frame([], None), interactive=False, elem_id="sweep-table")
        page.sweep_plot = gr.Plot(charts.sweep_figure({}), elem_id="sweep-plot")


def _wire_runs(ctx: UIContext, page: SimpleNamespace):
    """The runs list: refresh (button, every 3 s, after a delete), selection, delete, cards and the API.
    Returns the refresh handler (the tab's selection refreshes too)."""
    table, select, message, known = page.table, page.select, page.message, page.known

    def do_refresh(selected, last):
        frame, choices, kept, ids = refresh(ctx, selected, last)
        update = gr.skip() if choices is None else gr.update(choices=choices, value=kept)
        return frame, update, ids

    def show(selected):
        last = selected[-1] if selected else None
        return overlay(ctx, selected), run_config_yaml(ctx, last), run_log(ctx, last), run_coach(ctx, last)

    def on_row(selected, evt: gr.SelectData):
        row = evt.row_value or []
        return toggle_selection(selected, row[0]) if row else gr.skip()

    refresh_outputs = [table, select, known]
    page.refresh_btn.click(do_refresh, [select, gr.State(None)], refresh_outputs, api_name=False)
    gr.Timer(3.0).tick(do_refresh, [select, known], refresh_outputs, api_name=False, show_progress="hidden")
    select.change(show, select, [page.plot, page.config, page.log, page.coach], api_name=False)
    table.select(on_row, select, select, api_name=False)
    page.delete_btn.click(lambda ids: delete_runs(ctx, ids), select, message, api_name="delete_runs").then(
        do_refresh, [select, gr.State(None)], refresh_outputs, api_name=False
    )

    def api_list_runs() -> list[dict]:
        return list_runs(ctx)

    gr.api(api_list_runs, api_name="list_runs")

    def on_card(selected):
        text, path = write_run_card(ctx, selected[-1] if selected else None)
        return text, path

    page.card_btn.click(on_card, select, [page.card_text, page.card_file], api_name=False)

    def api_run_card(run_id: str) -> str:
        return write_run_card(ctx, run_id)[0]

    gr.api(api_run_card, api_name="run_card")
    return do_refresh


def _wire_sweeps(ctx: UIContext, page: SimpleNamespace):
    """The sweep view: its picker, refresh, the long run from the pick, the API, and a 3 s redraw while
    scan runs train. Returns the refresh handler (the tab's selection refreshes too)."""
    sweep, message = page.sweep, page.message
    sweep_outputs = [page.sweep_plot, page.sweep_table, page.sweep_pick]

    def refresh_sweeps(current):
        choices = sweep_choices(ctx)
        ids = [sweep_id for _, sweep_id in choices]
        value = current if current in ids else (ids[0] if ids else None)
        return gr.update(choices=choices, value=value), *sweep_view(ctx, value)

    sweep.change(lambda sweep_id: sweep_view(ctx, sweep_id), sweep, sweep_outputs, api_name=False)
    page.sweep_refresh.click(refresh_sweeps, sweep, [sweep, *sweep_outputs], api_name=False)
    page.promote.click(lambda sweep_id: promote_sweep(ctx, sweep_id), sweep, message, api_name="promote_sweep").then(
        refresh_sweeps, sweep, [sweep, *sweep_outputs], api_name=False
    )

    def api_sweep_summary(sweep_id: str) -> dict:
        sweep_obj, rows, pick = ctx.jobs.sweep_summary(sweep_id)
        return {
            "sweep": sweep_obj.id,
            "rows": [dataclasses.asdict(r) for r in rows],
            "pick": None if pick is None else dataclasses.asdict(pick),
        }

    gr.api(api_sweep_summary, api_name="sweep_summary")
    # While scan runs train, the view follows them; a finished sweep is not redrawn.
    gr.Timer(3.0).tick(
        lambda sweep_id: sweep_view(ctx, sweep_id) if sweep_active(ctx, sweep_id) else (gr.skip(),) * 3,
        sweep,
        sweep_outputs,
        api_name=False,
        show_progress="hidden",
    )
    return refresh_sweeps


def build(ctx: UIContext, tab: gr.Tab | None = None) -> None:
    page = _runs_list(ctx.jobs.store.list_runs())
    _run_details(page)
    _sweeps_panel(ctx, page)
    do_refresh = _wire_runs(ctx, page)
    refresh_sweeps = _wire_sweeps(ctx, page)
    if tab is not None:
        tab.select(do_refresh, [page.select, gr.State(None)], [page.table, page.select, page.known], api_name=False)
        tab.select(
            refresh_sweeps, page.sweep, [page.sweep, page.sweep_plot, page.sweep_table, page.sweep_pick], api_name=False
        )
