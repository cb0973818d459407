import sqlite3
import threading

import pytest

from studio.core.store import TRANSITIONS, IllegalTransition, RunNotFound, RunStatus, Store


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "studio.db")


def make(store, run_id="r1"):
    config = {"model": {"source": "bundled"}, "data": {"datasets": ["a", "b"]}}
    return store.create_run(run_id, "demo", config, "/x")


def test_new_run_is_queued_with_its_summary_columns(store):
    run = make(store)
    assert run.status == RunStatus.QUEUED and run.model == "bundled" and run.datasets == "a,b"


def test_legal_path_through_the_lifecycle(store):
    make(store)
    run = store.transition("r1", RunStatus.RUNNING, pid=123)
    assert run.pid == 123 and run.started_at is not None
    run = store.transition("r1", RunStatus.INTERRUPTED, error="gone")
    assert run.pid is None and run.finished_at is not None and run.error == "gone"
    run = store.transition("r1", RunStatus.QUEUED)
    assert run.error is None
    store.transition("r1", RunStatus.RUNNING)
    assert store.transition("r1", RunStatus.COMPLETED).status == RunStatus.COMPLETED


@pytest.mark.parametrize("old", list(RunStatus))
@pytest.mark.parametrize("new", list(RunStatus))
def test_transition_table_is_enforced(tmp_path, old, new):
    store = Store(tmp_path / "s.db")
    make(store)
    store.update_run("r1", status=old.value)
    if new in TRANSITIONS[old]:
        assert store.transition("r1", new).status == new
    else:
        with pytest.raises(IllegalTransition):
            store.transition("r1", new)
        assert store.get_run("r1").status == old


def test_completed_is_final(store):
    make(store)
    store.transition("r1", RunStatus.RUNNING)
    store.transition("r1", RunStatus.COMPLETED)
    assert TRANSITIONS[RunStatus.COMPLETED] == set()


def test_train_and_eval_logs_merge_into_one_row(store):
    make(store)
    store.log_metrics("r1", 10, loss=2.0, learning_rate=1e-4)
    store.log_metrics("r1", 10, eval_loss=2.5)
    (m,) = store.metrics("r1")
    assert (m.step, m.loss, m.eval_loss, m.learning_rate) == (10, 2.0, 2.5, 1e-4)
    run = store.get_run("r1")
    assert run.step == 10 and run.final_loss == 2.0


def test_truncate_metrics_for_resume(store):
    make(store)
    for step in (5, 10, 15):
        store.log_metrics("r1", step, loss=1.0 / step)
    assert store.truncate_metrics("r1", 10) == 1
    assert [m.step for m in store.metrics("r1")] == [5, 10]
    assert store.get_run("r1").step == 10


def test_unknown_run_and_unknown_fields(store):
    with pytest.raises(RunNotFound):
        store.get_run("nope")
    make(store)
    with pytest.raises(KeyError):
        store.log_metrics("r1", 1, bogus=1.0)


def test_deleting_a_run_deletes_its_metrics_and_events(store):
    make(store)
    store.log_metrics("r1", 1, loss=1.0)
    store.add_event("r1", "hello")
    store.delete_run("r1")
    assert store.metrics("r1") == [] and store.events("r1") == []


def test_wal_mode_and_a_lock_held_by_another_connection_is_waited_out(tmp_path):
    path = tmp_path / "s.db"
    store = Store(path)
    make(store)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    timer.start()
    store.log_metrics("r1", 1, loss=1.5)  # blocks until the other writer commits, then succeeds
    timer.join()
    assert store.metrics("r1")[0].loss == 1.5


def test_events_are_ordered_and_incremental(store):
    make(store)
    store.add_event("r1", "a")
    store.add_event("r1", "b", "warning")
    first = store.events("r1")
    assert [e.message for e in first] == ["a", "b"]
    assert store.events("r1", first[0].id)[0].level == "warning"


def test_threads_sharing_a_store_keep_their_transactions_apart(tmp_path):
    """The web server's handler threads share one Store: each must get its own transaction (CI once saw
    'cannot commit - no transaction is active' from two starts at the same moment)."""
    from concurrent.futures import ThreadPoolExecutor

    store = Store(tmp_path / "studio.db")

    def work(i: int) -> None:
        store.create_run(f"run-{i}", f"r{i}", {"model": {"source": "x"}}, str(tmp_path / f"run-{i}"))
        for step in range(1, 6):
            store.log_metrics(f"run-{i}", step, loss=1.0 / step)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(64)))
    assert len(store.list_runs()) == 64
    assert all(len(store.metrics(f"run-{i}")) == 5 for i in range(64))
    store.close()


# -- sweeps and the migration of older workspaces --------------------------------------------------------
# The runs table as the first release created it: no sweep_id column, no sweeps table.
OLD_SCHEMA = """
CREATE TABLE runs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL, config TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '', datasets TEXT NOT NULL DEFAULT '', run_dir TEXT NOT NULL,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, pid INTEGER, pid_started TEXT, error TEXT,
    step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL DEFAULT 0, final_loss REAL,
    adapter_dir TEXT, resume_from TEXT
);
CREATE TABLE metrics (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE, step INTEGER NOT NULL, time REAL NOT NULL,
    epoch REAL, loss REAL, eval_loss REAL, learning_rate REAL, grad_norm REAL, tokens_per_s REAL, memory_mb REAL,
    PRIMARY KEY (run_id, step)
);
INSERT INTO runs (id, name, status, config, run_dir, created_at, final_loss)
    VALUES ('old', 'old run', 'completed', '{"lora": {"r": 8}}', '/x', 1.0, 1.25);
INSERT INTO metrics (run_id, step, time, loss) VALUES ('old', 1, 1.0, 1.25);
"""


def old_workspace_db(path):
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA)
    conn.close()
    return path


def test_an_old_workspace_without_sweeps_opens_and_gains_them(tmp_path):
    path = old_workspace_db(tmp_path / "studio.db")
    store = Store(path)
    old = store.get_run("old")
    assert old.sweep_id is None and old.final_loss == 1.25 and store.metrics("old")[0].loss == 1.25  # kept
    assert old.devices is None
    columns = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(runs)")}
    assert {"sweep_id", "devices"} <= columns
    assert store.list_sweeps() == []
    sweep = store.create_sweep("s1", "scan", {"lora": {"r": 16}}, [{"path": "lora.r", "values": [8, 16]}], 50)
    assert sweep.long_run_id is None and sweep.params[0]["values"] == [8, 16]
    store.close()
    again = Store(path)  # a second open finds nothing left to migrate
    assert again.get_sweep("s1").name == "scan" and again.get_run("old").status == RunStatus.COMPLETED
    again.close()


def test_two_processes_opening_an_old_workspace_at_once_both_succeed(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = old_workspace_db(tmp_path / "studio.db")
    with ThreadPoolExecutor(4) as pool:  # each thread opens its own Store, as each process does
        stores = list(pool.map(lambda _: Store(path), range(4)))
    assert all(s.get_run("old").sweep_id is None for s in stores)
    for s in stores:
        s.close()


def test_a_sweep_and_its_runs_are_created_together_in_scan_order(store):
    runs = [(f"run-{r}", f"scan-r{r}", {"lora": {"r": r}}, f"/runs/run-{r}") for r in (8, 16, 32)]
    make(store, "earlier")  # queued before the sweep: it stays first
    store.create_sweep("s1", "scan", {}, [{"path": "lora.r", "values": [8, 16, 32]}], 50, runs)
    assert [r.id for r in store.runs_of_sweep("s1")] == ["run-8", "run-16", "run-32"]
    assert [r.id for r in store.queued_runs()] == ["earlier", "run-8", "run-16", "run-32"]
    assert store.get_run("run-8").sweep_id == "s1" and store.get_run("earlier").sweep_id is None


def test_a_failed_sweep_insert_leaves_neither_sweep_nor_runs(store):
    make(store, "taken")
    runs = [("fresh", "a", {}, "/a"), ("taken", "b", {}, "/b")]  # the 2nd id exists: the insert fails
    with pytest.raises(sqlite3.IntegrityError):
        store.create_sweep("s1", "scan", {}, [], 50, runs)
    assert store.list_sweeps() == [] and [r.id for r in store.list_runs()] == ["taken"]


def test_long_run_comes_last_and_deleted_runs_leave_the_sweep(store):
    from studio.core.store import SweepNotFound

    store.create_sweep("s1", "scan", {}, [], 50, [("a", "a", {}, "/a"), ("b", "b", {}, "/b")])
    store.create_run("long", "long", {}, "/long", sweep_id="s1")
    assert store.set_sweep_long_run("s1", "long").long_run_id == "long"
    assert [r.id for r in store.runs_of_sweep("s1")] == ["a", "b", "long"]
    assert [r.id for r in store.runs_of_sweep("s1", include_long=False)] == ["a", "b"]
    store.delete_run("a")
    store.delete_run("long")
    assert [r.id for r in store.runs_of_sweep("s1")] == ["b"] and store.get_sweep("s1").name == "scan"
    with pytest.raises(SweepNotFound, match="No sweep 'nope'"):
        store.get_sweep("nope")
    with pytest.raises(SweepNotFound):
        store.set_sweep_long_run("nope", "x")
