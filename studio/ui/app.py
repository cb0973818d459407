"""build_app() -> gr.Blocks; launch() serves it. Nothing is launched at import time.

This first page lists the workspace (runs, datasets, presets) and starts presets; the full tabs
(Datasets, Train, Runs, Chat, Export) build on the same engine calls.
"""

from __future__ import annotations

import os

import gradio as gr
import pandas as pd

from studio.jobs import JobManager
from studio.presets import preset_names
from studio.store import iso


def runs_frame(jobs: JobManager) -> pd.DataFrame:
    rows = [
        {
            "id": r.id,
            "status": r.status.value,
            "step": f"{r.step}/{r.total_steps}",
            "final loss": None if r.final_loss is None else round(r.final_loss, 4),
            "dataset": r.datasets,
            "model": r.model,
            "created": iso(r.created_at),
        }
        for r in jobs.store.list_runs()
    ]
    return pd.DataFrame(rows, columns=["id", "status", "step", "final loss", "dataset", "model", "created"])


def datasets_frame() -> pd.DataFrame:
    from studio.data import DatasetRegistry

    rows = [
        {"name": e.name, "format": e.format, "rows": e.rows, "bundled": e.bundled} for e in DatasetRegistry().list()
    ]
    return pd.DataFrame(rows, columns=["name", "format", "rows", "bundled"])


def start_preset(name: str) -> str:
    from studio.config import ConfigError
    from studio.presets import load_preset

    try:
        run = JobManager().submit(load_preset(name))
    except ConfigError as err:
        return "Cannot start: " + "; ".join(err.problems)
    return f"Run {run.id} is {run.status.value}."


def build_app() -> gr.Blocks:
    jobs = JobManager()
    with gr.Blocks(title="LoRA Studio") as app:
        gr.Markdown("# LoRA Studio\nFine-tune language models with LoRA and QLoRA, on the bundled model offline.")
        with gr.Row():
            preset = gr.Dropdown(preset_names(), value="quick-demo", label="Preset", elem_id="train-preset")
            start = gr.Button("Start", variant="primary", elem_id="train-start")
        status = gr.Markdown(elem_id="train-status")
        runs = gr.Dataframe(value=lambda: runs_frame(jobs), label="Runs", elem_id="runs-table", interactive=False)
        gr.Dataframe(value=datasets_frame, label="Datasets", elem_id="ds-table", interactive=False)
        start.click(start_preset, preset, status, api_name="start_preset")
        timer = gr.Timer(2.0)
        timer.tick(lambda: runs_frame(jobs), None, runs, api_name=False)
    return app


def launch(host: str = "127.0.0.1", port: int = 7860) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app()
    app.queue(default_concurrency_limit=8).launch(server_name=host, server_port=port, show_error=True)
    return 0
