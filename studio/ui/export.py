"""Export tab: merge a run's adapter into its full-precision base, or take the adapter alone.

The merge runs in a child process (studio.services.exporter, which runs `studio export --json`): loading a
base model for merging inside the web server would keep its memory (and VRAM) held long after the export.
The tab shows the child's progress, then its result or its error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.core.store import RunStatus
from studio.core.workspace import RunDir
from studio.services.exporter import ExportEvent, export_events
from studio.ui.common import UIContext

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}$")
ExportView = tuple[str, pd.DataFrame | None, str | None]  # message, files table, zip path


def exportable_runs(ctx: UIContext) -> list[tuple[str, str]]:
    """(label, run id) for completed runs that have a final adapter, newest first."""
    out = []
    for run in ctx.jobs.store.list_runs(RunStatus.COMPLETED):
        if RunDir.is_adapter(run.adapter_dir):
            out.append((f"{run.name} ({run.id})", run.id))
    return out


def exports_dir(ctx: UIContext) -> Path:
    return ctx.home / "exports"


def target_dir(ctx: UIContext, run_id: str, kind: str, folder_name: str | None) -> Path:
    """Exports land in STUDIO_HOME/exports/NAME: a bare folder name, never a path outside."""
    name = (folder_name or "").strip() or f"{run_id}-{kind}"
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"Folder name '{name}' is not allowed: use letters, digits, '-', '_' or '.', no slashes. "
            f"Exports are written under {exports_dir(ctx)}."
        )
    return exports_dir(ctx) / name


def files_table(folder: Path) -> pd.DataFrame:
    rows = [
        {"file": p.name, "size (MiB)": round(p.stat().st_size / 2**20, 3)}
        for p in sorted(folder.iterdir())
        if p.is_file()
    ]
    return pd.DataFrame(rows, columns=["file", "size (MiB)"])


def export_view(event: ExportEvent, kind: str) -> ExportView:
    """What the tab shows for one event of the export's report."""
    if event.kind == "progress":
        return f"⏳ {event.message}…", None, None
    if event.kind == "error":
        return f"**Export failed:** {event.message}", None, None
    out = Path(event.data["out_dir"])
    zip_path = event.data.get("zip")
    what = "Merged model (base + adapter, an ordinary HF folder)" if kind == "merged" else "Adapter (PEFT format)"
    message = f"**{what}** saved to `{out}`. Download the zip below, or load the folder with `from_pretrained`."
    return message, files_table(out), zip_path if zip_path and Path(zip_path).is_file() else None


def run_export(
    ctx: UIContext, run_id: str | None, kind: str, folder_name: str, dtype: str, overwrite: bool
) -> Iterator[ExportView]:
    """Export in a child process, showing its progress, then its result or error."""
    if not run_id:
        yield "Pick a completed run to export.", None, None
        return
    try:
        out = target_dir(ctx, run_id, kind, folder_name)
    except ValueError as err:
        yield f"**Error:** {err}", None, None
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    for event in export_events(ctx.home, run_id, kind, out, dtype, overwrite):
        yield export_view(event, kind)


def build(ctx: UIContext, tab) -> None:
    gr.Markdown(
        "Merge the adapter into its base (loaded in full precision, also for QLoRA runs) to get an ordinary "
        "model folder, or take the adapter alone to load on top of the base with PEFT."
    )
    with gr.Row():
        run = gr.Dropdown(choices=exportable_runs(ctx), label="Run", elem_id="export-run", scale=3)
        dtype = gr.Dropdown(["fp32", "bf16", "fp16"], value="fp32", label="Saved dtype", elem_id="export-dtype")
    with gr.Row():
        folder = gr.Textbox(label="Folder name under exports/ (empty: from the run id)", elem_id="export-dir")
        overwrite = gr.Checkbox(label="Overwrite an existing folder", elem_id="export-overwrite")
    with gr.Row():
        merge = gr.Button("Merge and save model", variant="primary", elem_id="export-merge")
        adapter = gr.Button("Save adapter only", elem_id="export-adapter")
    message = gr.Markdown(elem_id="export-message")
    files = gr.Dataframe(label="Files", elem_id="export-files", interactive=False)
    download = gr.File(label="Download (zip)", elem_id="export-download", interactive=False)

    def refresh():
        return gr.update(choices=exportable_runs(ctx))

    tab.select(refresh, None, run, api_name=False)
    inputs, outputs = [run, folder, dtype, overwrite], [message, files, download]
    merge.click(_export_handler(ctx, "merged"), inputs, outputs, api_name="export_merged")
    adapter.click(_export_handler(ctx, "adapter"), inputs, outputs, api_name="export_adapter")


def _export_handler(ctx: UIContext, kind: str):
    """A generator handler (gradio streams each yield to the page) for one kind of export."""

    def export(r, f, d, o):
        yield from run_export(ctx, r, kind, f, d, o)

    return export
