"""Load and restarts against a real server: two API clients start runs at once (both queue, both
complete one after the other, metrics kept apart), 20 concurrent chat requests all get answers, status
calls keep answering while a run trains, and a killed-and-restarted server finds the run still going."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from studio.core.config import RunConfig
from studio.core.procs import process_alive
from studio.core.store import RunStatus
from studio.runs.queue import JobManager
from tests.e2e.conftest import ARTIFACTS, Server, stop_workers, wait_plot_points
from tests.e2e.test_reattach import long_tiny_run

pytestmark = pytest.mark.e2e


@pytest.fixture
def fresh_server(tmp_path):
    srv = Server(tmp_path / "home").start()
    try:
        yield srv
    finally:
        srv.stop()
        stop_workers(srv.home)


def form_config(model_dir, name: str, steps: int) -> RunConfig:
    cfg = RunConfig(name=name)
    cfg.model.source = str(model_dir)
    cfg.data.datasets = ["studio-facts"]
    cfg.data.cutoff_len = 64
    cfg.lora.r = 4
    cfg.train.max_steps = steps
    cfg.train.logging_steps = 1
    cfg.train.num_threads = 1
    return cfg


def test_two_clients_start_runs_at_once_and_chat_holds_20_requests(fresh_server, tiny_model_dir):
    from gradio_client import Client

    from studio.ui.train import form_from_config

    clients = [Client(fresh_server.url, verbose=False) for _ in range(2)]
    configs = [form_config(tiny_model_dir, f"client-{i}", steps=12 + 6 * i) for i in range(2)]
    barrier = threading.Barrier(2)

    def start(i: int):
        barrier.wait()  # both requests leave together
        return clients[i].predict(*form_from_config(configs[i]), api_name="/start_training")

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(start, range(2)))
    run_ids = [run_id for _, run_id in results]
    assert all(isinstance(r, str) and r for r in run_ids), results  # a refused start returns gr.skip()

    latencies = []
    deadline = time.monotonic() + 300
    statuses = {}
    while time.monotonic() < deadline:
        for run_id in run_ids:
            t0 = time.perf_counter()
            statuses[run_id] = clients[0].predict(run_id, api_name="/run_status")
            latencies.append(time.perf_counter() - t0)
        if all(s["status"] == "completed" for s in statuses.values()):
            break
        time.sleep(0.5)
    assert all(s["status"] == "completed" for s in statuses.values()), statuses

    jobs = JobManager(fresh_server.home)
    first, second = sorted((jobs.store.get_run(r) for r in run_ids), key=lambda r: r.started_at)
    assert first.finished_at <= second.started_at  # one training slot: one after the other
    for run, cfg in ((jobs.store.get_run(run_ids[0]), configs[0]), (jobs.store.get_run(run_ids[1]), configs[1])):
        steps = [m.step for m in jobs.store.metrics(run.id) if m.loss is not None]
        assert steps == list(range(1, cfg.train.max_steps + 1)), (run.name, steps)  # no mixed-up metrics

    # Status calls kept answering while runs trained; the figures go to the artifacts, not an assertion
    # on speed (that is the benchmark's job): here only that none hung.
    latencies.sort()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "status-latency.json").write_text(
        json.dumps({"calls": len(latencies), "median_s": latencies[len(latencies) // 2], "max_s": latencies[-1]})
    )
    assert latencies[-1] < 30

    # 20 chat requests at once on the bundled model: all answered, none dropped, none mixed up (greedy
    # decoding gives every request for a question the same answer as when it is asked alone).
    clients[0].predict("bundled", [], "fp32", api_name="/chat_load")
    questions = ["What is the capital of France?", "Name a large planet."]
    alone = [clients[0].predict(q, "base", "", 8, api_name="/chat") for q in questions]
    assert all(a.strip() for a in alone), alone
    chat_clients = [Client(fresh_server.url, verbose=False) for _ in range(4)]

    def ask(i: int) -> str:
        return chat_clients[i % 4].predict(questions[i % 2], "base", "", 8, api_name="/chat")

    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(ask, range(20)))
    assert replies == [alone[i % 2] for i in range(20)]


def test_server_killed_and_restarted_while_a_run_trains(tmp_path, tiny_model_dir, browser):
    home = tmp_path / "home"
    server = Server(home).start()
    jobs = JobManager(home)
    try:
        run = jobs.submit(long_tiny_run(tiny_model_dir))
        deadline = time.monotonic() + 60
        while jobs.store.get_run(run.id).step < 10 and time.monotonic() < deadline:
            time.sleep(0.2)
        server.stop()  # SIGKILL to the whole server session, as a crash would
        worker = jobs.store.get_run(run.id)
        assert worker.status == RunStatus.RUNNING and process_alive(worker.pid, worker.pid_started)
        step_at_crash = worker.step

        server.start()  # a new server on the same workspace
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        try:
            page.goto(server.url)
            page.get_by_role("tab", name="Train").click()
            page.wait_for_function(
                "(id) => document.querySelector('#train-status')?.innerText.includes(id)"
                " && document.querySelector('#train-status').innerText.includes('running')",
                arg=run.id,
                timeout=60_000,
            )
            # every point logged before the crash is there
            wait_plot_points(page, "loss-plot", max(1, step_at_crash // 5), timeout_s=60)
        finally:
            page.context.close()
        assert jobs.store.get_run(run.id).step > step_at_crash  # it went on training meanwhile
    finally:
        current = jobs.store.get_run(run.id)
        if current.status == RunStatus.RUNNING:
            jobs.abort(run.id)
            jobs.wait(run.id, timeout=60)
        server.stop()
        stop_workers(home)
