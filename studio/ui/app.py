"""build_app() -> gr.Blocks; launch() serves it. Nothing is launched at import time.

Tabs are modules (datasets, train, runs, chat, evaluate, export), each `build(ctx, tab)`. The page holds no run
state of its own: everything it shows is read from the store, so several browser tabs, reloads and
runs started from the CLI all see the same thing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gradio as gr

from studio.core.security import ROOTS_ENV
from studio.core.workspace import bundled_datasets_dir, ensure_home, models_cache_dir
from studio.model.loading import prepare_bundled_model
from studio.ui import chat, datasets, evaluate, export, runs, train
from studio.ui.common import UIContext

TITLE = "LoRA Studio"
CSS = """
#train-progress .bar { background: var(--color-accent); height: 100%; border-radius: 4px; }
#train-progress .track { background: var(--neutral-200); height: 12px; border-radius: 4px; overflow: hidden; }
"""

TABS = (
    ("Datasets", "tab-datasets", datasets.build),
    ("Train", "tab-train", train.build),
    ("Runs", "tab-runs", runs.build),
    ("Chat", "tab-chat", chat.build),
    ("Evaluate", "tab-evaluate", evaluate.build),
    ("Export", "tab-export", export.build),
)


def warm_imports() -> None:
    """Import transformers' lazily-loaded classes once, on the main thread. Two request threads touching
    them first at the same moment can fail with "cannot import name 'AutoConfig'" (the lazy module is
    not thread-safe). This loads code only, no model: the page does not wait for any model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def build_app(home: Path) -> gr.Blocks:
    warm_imports()
    ctx = UIContext(ensure_home(home))
    ctx.jobs.reconcile()  # runs whose worker died while no server was up become interrupted
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(
            f"# {TITLE}\nFine-tune language models with LoRA and QLoRA. Runs train in their own processes: "
            "close this page any time, they go on."
        )
        with gr.Tabs():
            for label, elem_id, build in TABS:
                with gr.Tab(label, id=elem_id, elem_id=elem_id) as tab:
                    build(ctx, tab)
    return app


def default_roots(home: Path) -> list[Path]:
    """What a network-facing studio may always read: its workspace, converted models, the bundled samples,
    and gradio's upload folder (uploads land there before they are registered)."""
    upload_dir = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    return [home, models_cache_dir(home), bundled_datasets_dir(), upload_dir]


def launch(
    home: Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: list[tuple[str, str]] | None = None,
    allowed_roots: list[Path] | None = None,
    **kwargs,
) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    home = ensure_home(home)
    if allowed_roots is not None:
        # Read by the engine (studio.core.security.ensure_allowed) in this process and in the workers it starts.
        os.environ[ROOTS_ENV] = os.pathsep.join(str(p) for p in allowed_roots)
    # A new workspace has no converted bundled model yet: convert it in the background now, so the first
    # visit finds it ready or nearly so, and no handler waits for it (the Train tab shows a note meanwhile).
    prepare_bundled_model()
    app = build_app(home)
    app.queue(default_concurrency_limit=8).launch(
        server_name=host,
        server_port=port,
        show_error=True,
        css=CSS,
        auth=auth,
        auth_message="LoRA Studio: sign in." if auth else None,
        allowed_paths=[str(home / "exports")],
        **kwargs,
    )
    return 0
