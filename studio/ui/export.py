"""Export tab: merge a run's adapter into its full-precision base, or take the adapter alone.

The merge runs in a child process (`studio export`, the CLI): loading a base model for merging inside
the web server would keep its memory (and VRAM) held long after the export.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.core.allocator import child_env
from studio.core.store import RunStatus
from studio.core.workspace import RunDir
from studio.ui.common import UIContext

EXPORT_TIMEOUT_S = 1800
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}$")


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


def run_export(
    ctx: UIContext, run_id: str | None, kind: str, folder_name: str, dtype: str, overwrite: bool
) -> tuple[str, pd.DataFrame | None, str | None]:
    """Export through the CLI in a child process. Returns (message, files table, zip path)."""
    if not run_id:
        return "Pick a completed run to export.", None, None
    try:
        out = target_dir(ctx, run_id, kind, folder_name)
    except ValueError as err:
        return f"**Error:** {err}", None, None
    out.parent.mkdir(parents=True, exist_ok=True)
    flag = "--merge" if kind == "merged" else "--adapter"
    cmd = [sys.executable, "-m", "studio.cli", "export", run_id, flag, str(out), "--dtype", dtype, "--zip"]
    if overwrite:
        cmd.append("--overwrite")
    env = child_env(dict(os.environ, STUDIO_HOME=str(ctx.home)))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=EXPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"**Error:** the export took longer than {EXPORT_TIMEOUT_S // 60} minutes and was stopped.", None, None
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["unknown error"])[-1].removeprefix("error: ")
        return f"**Export failed:** {reason}", None, None
    zip_path = out.with_suffix(".zip")
    what = "Merged model (base + adapter, an ordinary HF folder)" if kind == "merged" else "Adapter (PEFT format)"
    message = f"**{what}** saved to `{out}`. Download the zip below, or load the folder with `from_pretrained`."
    return message, files_table(out), str(zip_path) if zip_path.is_file() else None


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
    merge.click(
        lambda r, f, d, o: run_export(ctx, r, "merged", f, d, o),
        [run, folder, dtype, overwrite],
        [message, files, download],
        api_name="export_merged",
    )
    adapter.click(
        lambda r, f, d, o: run_export(ctx, r, "adapter", f, d, o),
        [run, folder, dtype, overwrite],
        [message, files, download],
        api_name="export_adapter",
    )
