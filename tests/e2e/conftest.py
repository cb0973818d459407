"""A real `studio serve` in a subprocess on a free port, and headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import CHROMIUM, CHROMIUM_ARGS, free_port, kill_tree, spawn_in_session, wait_http

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"

# Points in the first trace of a drawn plotly chart. Before the first metric arrives the chart is an
# empty figure (el.data == []), so every step of the chain is guarded.
PLOT_POINTS_JS = """(id) => {
    const el = document.querySelector(`#${id} .js-plotly-plot`);
    if (!el || !el.data || !el.data.length || !el.data[0].x) return 0;
    return el.data[0].x.length;
}"""


def plot_points(page, elem_id: str) -> int:
    """Points in the first trace of a plotly chart, read from the chart the browser drew."""
    return page.evaluate(PLOT_POINTS_JS, elem_id)


def wait_plot_points(page, elem_id: str, at_least: int, timeout_s: float) -> None:
    page.wait_for_function(
        f"([id, n]) => ({PLOT_POINTS_JS})(id) >= n", arg=[elem_id, at_least], timeout=timeout_s * 1000
    )


class Server:
    def __init__(self, home: Path, extra_args: list[str] | None = None, env: dict | None = None):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = home.parent / f"server-{self.port}.log"
        self.args = extra_args or []
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        env = dict(os.environ, STUDIO_HOME=str(self.home), HF_HUB_OFFLINE="1", **self.env)
        cmd = [sys.executable, "-m", "studio.cli", "serve", "--port", str(self.port), *self.args]
        self.proc = spawn_in_session(cmd, env, self.log_path)
        wait_http(self.url)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc.wait(timeout=30)
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""


def stop_workers(home: Path) -> None:
    """Runs the server started train in their own sessions: end them too. Queued runs are dropped first:
    a worker ended by SIGTERM aborts cleanly and would start the next queued run on its way out."""
    from studio.core.store import RunStatus, Store
    from studio.core.workspace import db_path

    if not db_path(home).exists():
        return
    store = Store(db_path(home))
    for run in store.list_runs(RunStatus.QUEUED):
        store.transition(run.id, RunStatus.ABORTED, error="Dropped when the test server stopped.")
    for run in store.list_runs(RunStatus.RUNNING):
        if run.pid:
            kill_tree(run.pid)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e-home")
    srv = Server(home).start()
    try:
        yield srv
    finally:
        srv.stop()
        stop_workers(home)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `make test` installs it (apt-get install chromium chromium-driver).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        context.close()
