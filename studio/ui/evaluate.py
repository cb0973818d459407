"""The Evaluate tab: a finished run scored with and without its adapter, side by side, with example answers.

The evaluation runs in a child process (`python -m studio.cli eval RUN --json`, the CLI): the web server
never holds a model, and closing the page mid-evaluation ends the child. Callbacks are module-level
functions of a UIContext and plain values; `build` only wires them.
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr
import pandas as pd

from studio.core.store import RunNotFound, RunStatus
from studio.core.workspace import RunDir
from studio.reports.evaluate import (
    EVAL_TIMEOUT_S,
    VALIDATION,
    EvalError,
    EvalReport,
    EvalSpec,
    check_spec,
    eval_process,
    load_latest,
    summary_table,
)
from studio.ui.common import UIContext, error_message

TABLE_COLUMNS = ["metric", "base", "adapter", "change"]
EXAMPLE_COLUMNS = ["prompt", "reference", "base", "adapter"]
Outputs = tuple[str, pd.DataFrame | None, pd.DataFrame | None]  # status, table, examples; None = unchanged


def evaluable_runs(ctx: UIContext) -> list[tuple[str, str]]:
    """(label, run id) for completed runs that have a final adapter, newest first."""
    out = []
    for run in ctx.jobs.store.list_runs(RunStatus.COMPLETED):
        if RunDir.is_adapter(run.adapter_dir):
            out.append((f"{run.name} ({run.id})", run.id))
    return out


def dataset_choices(ctx: UIContext) -> list[str]:
    return [VALIDATION, *(e.name for e in ctx.registry().list())]


def table_frame(report: EvalReport | None) -> pd.DataFrame:
    rows = summary_table(report) if report is not None else []
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def examples_frame(report: EvalReport | None) -> pd.DataFrame:
    rows = [vars(e) for e in report.examples] if report is not None else []
    return pd.DataFrame(rows, columns=EXAMPLE_COLUMNS)


def report_message(report: EvalReport, saved: bool = False) -> str:
    g = report.generation
    when = "Evaluated" if saved else "Latest evaluation"
    return (
        f"**{when}:** run `{report.run_id}` on {report.dataset}: loss on {report.samples} samples, "
        f"{g.prompts} prompts answered greedily (up to {g.max_new_tokens} new tokens). "
        "Change = adapter - base: lower is better for loss and perplexity, higher for the rest."
    )


def show_latest(ctx: UIContext, run_id: str | None) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """The picked run's latest saved report (empty tables when it has none)."""
    if not run_id:
        return "Pick a completed run to evaluate.", table_frame(None), examples_frame(None)
    try:
        run = ctx.jobs.store.get_run(run_id)
        report = load_latest(run.run_dir)
    except (RunNotFound, EvalError) as err:
        return error_message(err), table_frame(None), examples_frame(None)
    if report is None:
        val_size = (run.config.get("data") or {}).get("val_size") or 0
        hint = "" if val_size > 0 else " It trained without a validation split: pick a dataset to evaluate on."
        message = f"Run `{run_id}` has not been evaluated yet. Press Evaluate.{hint}"
        return message, table_frame(None), examples_frame(None)
    return report_message(report), table_frame(report), examples_frame(report)


def make_spec(run_id: str | None, dataset: str | None, samples, gen_samples, max_new_tokens) -> EvalSpec:
    """Widget values -> EvalSpec; gr.Number gives floats (or None when cleared)."""
    if not run_id:
        raise EvalError("Pick a completed run to evaluate.")
    numbers = []
    for name, value in (("samples", samples), ("generation prompts", gen_samples), ("max new tokens", max_new_tokens)):
        if value is None or float(value) != int(value):
            raise EvalError(f"Give a whole number for {name} (got {value!r}).")
        numbers.append(int(value))
    return EvalSpec(run_id, dataset, *numbers)


def run_evaluation(
    ctx: UIContext,
    run_id: str | None,
    dataset: str | None,
    samples,
    gen_samples,
    max_new_tokens,
    timeout_s: float = EVAL_TIMEOUT_S,
) -> Iterator[Outputs]:
    """Evaluate in a child process; yields progress as status lines, then the tables (or the error)."""
    try:
        spec = make_spec(run_id, dataset, samples, gen_samples, max_new_tokens)
        check_spec(spec, ctx.home)  # instant answers for what needs no model: run, adapter, data
    except EvalError as err:
        yield error_message(err), None, None
        return
    yield f"Evaluating `{spec.run_id}` in a separate process: starting…", None, None
    for item in eval_process(spec, ctx.home, timeout_s):
        if isinstance(item, str):
            yield f"Evaluating `{spec.run_id}`: {item}…", None, None
        elif item.report is not None:
            yield report_message(item.report, saved=True), table_frame(item.report), examples_frame(item.report)
        else:
            yield f"**Evaluation failed:** {item.error}", None, None


def latest_report_dict(ctx: UIContext, run_id: str) -> dict:
    """The run's latest report as saved (for API callers); {} when it was never evaluated."""
    run = ctx.jobs.store.get_run(run_id)
    report = load_latest(run.run_dir)
    return report.to_dict() if report is not None else {}


def _skip_none(values: Outputs) -> tuple:
    return tuple(gr.skip() if v is None else v for v in values)


def build(ctx: UIContext, tab: gr.Tab | None = None) -> None:
    gr.Markdown(
        "Score a finished run with and without its adapter: loss and perplexity on the run's validation split "
        "or any registered dataset, and greedy answers to held-out prompts compared with the reference "
        "(exact match, chrF, ROUGE-L). The model loads in a separate process, which ends when it is done."
    )
    with gr.Row():
        run = gr.Dropdown(choices=evaluable_runs(ctx), value=None, label="Run", elem_id="eval-run", scale=3)
        dataset = gr.Dropdown(
            choices=dataset_choices(ctx), value=VALIDATION, label="Evaluate on", elem_id="eval-dataset", scale=2
        )
    with gr.Row():
        samples = gr.Number(value=32, precision=0, minimum=1, label="Samples for loss", elem_id="eval-samples")
        gen_samples = gr.Number(value=8, precision=0, minimum=1, label="Prompts to answer", elem_id="eval-gen-samples")
        max_new = gr.Number(value=64, precision=0, minimum=1, label="Max new tokens", elem_id="eval-max-new-tokens")
        start = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
    status = gr.Markdown(elem_id="eval-status")
    table = gr.Dataframe(table_frame(None), label="Base vs adapter", interactive=False, elem_id="eval-table")
    examples = gr.Dataframe(
        examples_frame(None), label="Example answers", interactive=False, wrap=True, elem_id="eval-examples"
    )

    def evaluate(r, d, n, g, m):
        for values in run_evaluation(ctx, r, d, n, g, m):
            yield _skip_none(values)

    def refresh(current):
        ids = [value for _, value in evaluable_runs(ctx)]
        return (
            gr.update(choices=evaluable_runs(ctx), value=current if current in ids else None),
            gr.update(choices=dataset_choices(ctx)),
        )

    run.change(lambda r: show_latest(ctx, r), run, [status, table, examples], api_name=False)
    start.click(
        evaluate, [run, dataset, samples, gen_samples, max_new], [status, table, examples], api_name="evaluate_run"
    )

    def eval_report(run_id: str) -> dict:
        try:
            return latest_report_dict(ctx, run_id)
        except (RunNotFound, EvalError) as err:
            raise gr.Error(str(err)) from err

    gr.api(eval_report, api_name="eval_report")
    if tab is not None:
        tab.select(refresh, run, [run, dataset], api_name=False)
