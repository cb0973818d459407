"""The run store: SQLite in WAL mode, shared by the web server, the CLI and every worker process.

Runs, their metrics and their events; sweeps (short scan runs plus the long run promoted from their pick).
Status changes go through `transition`, which refuses illegal moves (a completed run never becomes running
again). Writers retry when another process holds the lock. Older workspaces are migrated on open.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from studio.core.errors import ExitCode, StudioError
from studio.core.problems import StrEnum


class RunStatus(StrEnum):
    """A run's state; the values are what the store, the JSON output and the CLI write."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.ABORTED, RunStatus.INTERRUPTED)


# Legal moves. Resuming puts a stopped run back in the queue; nothing leaves "completed".
TRANSITIONS: dict[RunStatus, set[RunStatus]] = {
    RunStatus.QUEUED: {RunStatus.RUNNING, RunStatus.ABORTED, RunStatus.FAILED},
    RunStatus.RUNNING: {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.ABORTED, RunStatus.INTERRUPTED},
    RunStatus.FAILED: {RunStatus.QUEUED},
    RunStatus.ABORTED: {RunStatus.QUEUED},
    RunStatus.INTERRUPTED: {RunStatus.QUEUED},
    RunStatus.COMPLETED: set(),
}


class IllegalTransition(StudioError, RuntimeError):
    exit_code = ExitCode.FAILED


class RunNotFound(StudioError, KeyError):
    def __str__(self) -> str:
        return f"No run '{self.args[0]}'. List runs with `studio runs`."


class SweepNotFound(StudioError, KeyError):
    def __str__(self) -> str:
        return f"No sweep '{self.args[0]}'. List sweeps with `studio sweep list`."


# What the preference stages log besides the loss (DPO/ORPO rewards and log-probs, KTO's KL term).
PREFERENCE_METRICS = (
    "reward_chosen",
    "reward_rejected",
    "reward_margin",
    "reward_accuracy",
    "logps_chosen",
    "logps_rejected",
    "kl",
    "eval_reward_accuracy",
    "eval_reward_margin",
)
METRIC_FIELDS = (
    "epoch",
    "loss",
    "eval_loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_s",
    "memory_mb",
    *PREFERENCE_METRICS,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    datasets TEXT NOT NULL DEFAULT '',
    run_dir TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    pid INTEGER,
    pid_started TEXT,
    error TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    final_loss REAL,
    adapter_dir TEXT,
    resume_from TEXT,
    sweep_id TEXT,
    devices TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    epoch REAL,
    loss REAL,
    eval_loss REAL,
    learning_rate REAL,
    grad_norm REAL,
    tokens_per_s REAL,
    memory_mb REAL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    time REAL NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events(run_id, id);
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    base_config TEXT NOT NULL,
    params TEXT NOT NULL,
    scan_steps INTEGER NOT NULL,
    long_run_id TEXT
);
"""

# Columns added after the first release, as (table, column, declaration). Workspaces made by an earlier
# version lack them; `_migrate` adds each one missing, so an old studio.db opens with nothing lost.
_ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("runs", "sweep_id", "TEXT"),
    ("runs", "devices", "TEXT"),
    *(("metrics", name, "REAL") for name in PREFERENCE_METRICS),
)
# Indexes on added columns: created only once the column surely exists.
_LATE_INDEXES = "CREATE INDEX IF NOT EXISTS runs_sweep ON runs(sweep_id, created_at);"


@dataclass
class Run:
    id: str
    name: str
    status: RunStatus
    config: dict[str, Any]
    model: str
    datasets: str
    run_dir: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = None
    pid_started: str | None = None
    error: str | None = None
    step: int = 0
    total_steps: int = 0
    final_loss: float | None = None
    adapter_dir: str | None = None
    resume_from: str | None = None
    sweep_id: str | None = None  # the sweep this run scans for, or whose long run it is
    devices: str | None = None  # what the queue gave the running run: 'cpu' or CUDA ids '0,1'

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["status"] = self.status.value
        d["duration_s"] = self.duration_s
        return d


@dataclass
class Metric:
    step: int
    time: float
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    memory_mb: float | None = None
    reward_chosen: float | None = None  # preference stages (PREFERENCE_METRICS)
    reward_rejected: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    logps_chosen: float | None = None
    logps_rejected: float | None = None
    kl: float | None = None
    eval_reward_accuracy: float | None = None
    eval_reward_margin: float | None = None


@dataclass
class Event:
    id: int
    run_id: str
    time: float
    level: str
    message: str


@dataclass
class Sweep:
    """A group of short scan runs over one or two parameters; the long run is promoted from their pick."""

    id: str
    name: str
    created_at: float
    base_config: dict[str, Any]  # what the user filled in: its own epochs/max_steps are the long run's
    params: list[dict[str, Any]]  # [{"path": "lora.r", "values": [8, 16, 32]}, ...] in the order given
    scan_steps: int  # train.max_steps of each scan run
    long_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Store:
    """One SQLite file. Open a Store per process (connections are not shared across forks)."""

    path: Path
    lock_wait_s: float = 60.0  # beyond SQLite's own busy timeout, for a writer that holds on long
    # One connection per thread: a transaction lives on its connection, so threads sharing one (the web
    # server's handlers) would commit or roll back each other's work.
    _local: threading.local = field(default_factory=threading.local, init=False, repr=False)
    _conns: list[sqlite3.Connection] = field(default_factory=list, init=False, repr=False)
    _conns_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # executescript commits on its own, so it runs outside _tx; CREATE ... IF NOT EXISTS is idempotent.
        self._connect().executescript(_SCHEMA)
        self._migrate()
        self._connect().executescript(_LATE_INDEXES)

    # -- plumbing -----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # check_same_thread=False only so close() may close it from another thread; it is used by one.
            conn = sqlite3.connect(self.path, timeout=5, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=5000")
            self._use_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL. On a file still in rollback mode (a new or older workspace) the switch needs
        the file to itself, and SQLite answers 'locked' at once, without its busy wait, while another
        process opens it too: wait for that here."""
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, retried while another process holds the lock beyond busy_timeout."""
        conn = self._connect()
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err):
                    raise
                if time.monotonic() > deadline:
                    raise sqlite3.OperationalError(
                        f"The run store {self.path} stayed locked for {self.lock_wait_s:.0f} s; "
                        "is another program holding it open in a transaction?"
                    ) from err
                time.sleep(0.1)
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def _missing_columns(self, c: sqlite3.Connection) -> list[tuple[str, str, str]]:
        tables = {table for table, _, _ in _ADDED_COLUMNS}
        have = {t: {r["name"] for r in c.execute(f"PRAGMA table_info({t})")} for t in tables}
        return [(t, col, decl) for t, col, decl in _ADDED_COLUMNS if col not in have[t]]

    def _migrate(self) -> None:
        """Add the columns an older studio.db lacks. Checked again inside a write transaction, so two
        processes opening the same old workspace at once do not both add a column ('duplicate column')."""
        if not self._missing_columns(self._connect()):
            return  # the usual case: no write lock taken just to open the store
        with self._tx() as c:
            for table, column, decl in self._missing_columns(c):
                c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self._connect().execute(sql, args).fetchall()

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    # -- runs ---------------------------------------------------------------------------------
    def create_run(
        self, run_id: str, name: str, config: dict[str, Any], run_dir: str, sweep_id: str | None = None
    ) -> Run:
        with self._tx() as c:
            _insert_run(c, run_id, name, config, run_dir, time.time(), sweep_id)
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> Run:
        rows = self._query("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise RunNotFound(run_id)
        return _row_to_run(rows[0])

    def list_runs(self, status: RunStatus | None = None) -> list[Run]:
        if status is None:
            rows = self._query("SELECT * FROM runs ORDER BY created_at DESC")
        else:
            rows = self._query("SELECT * FROM runs WHERE status = ? ORDER BY created_at DESC", (status.value,))
        return [_row_to_run(r) for r in rows]

    def queued_runs(self) -> list[Run]:
        """Oldest first: the queue order."""
        rows = self._query("SELECT * FROM runs WHERE status = ? ORDER BY created_at, rowid", (RunStatus.QUEUED.value,))
        return [_row_to_run(r) for r in rows]

    def transition(self, run_id: str, new: RunStatus, **fields: Any) -> Run:
        """Move a run to `new`, refusing illegal moves; `fields` update other columns atomically."""
        with self._tx() as c:
            row = c.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(run_id)
            old = RunStatus(row["status"])
            if new not in TRANSITIONS[old]:
                raise IllegalTransition(f"Run {run_id} is {old.value}; it cannot become {new.value}.")
            now = time.time()
            if new == RunStatus.RUNNING:
                fields.setdefault("started_at", now)
                fields.setdefault("finished_at", None)
            elif new.finished:
                fields.setdefault("finished_at", now)
                fields.setdefault("pid", None)
            elif new == RunStatus.QUEUED:
                fields.setdefault("error", None)
            self._update(c, run_id, status=new.value, **fields)
        return self.get_run(run_id)

    def update_run(self, run_id: str, **fields: Any) -> None:
        with self._tx() as c:
            self._update(c, run_id, **fields)

    @staticmethod
    def _update(c: sqlite3.Connection, run_id: str, **fields: Any) -> None:
        if not fields:
            return
        allowed = set(Run.__dataclass_fields__) - {"id"}
        bad = set(fields) - allowed
        if bad:
            raise KeyError(f"Unknown run fields: {sorted(bad)}")
        if "config" in fields:
            fields["config"] = json.dumps(fields["config"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        c.execute(f"UPDATE runs SET {cols} WHERE id = ?", (*fields.values(), run_id))

    def delete_run(self, run_id: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    # -- sweeps -------------------------------------------------------------------------------
    def create_sweep(
        self,
        sweep_id: str,
        name: str,
        base_config: dict[str, Any],
        params: list[dict[str, Any]],
        scan_steps: int,
        runs: Sequence[tuple[str, str, dict[str, Any], str]] = (),
    ) -> Sweep:
        """Create a sweep and queue its scan runs, (run_id, name, config, run_dir) in scan order, in ONE
        transaction: a sweep is never seen half-queued, and no other run can slip in between its runs."""
        now = time.time()
        with self._tx() as c:
            c.execute(
                "INSERT INTO sweeps (id, name, created_at, base_config, params, scan_steps) VALUES (?, ?, ?, ?, ?, ?)",
                (sweep_id, name, now, json.dumps(base_config), json.dumps(params), scan_steps),
            )
            for i, (run_id, run_name, config, run_dir) in enumerate(runs):
                # Strictly increasing created_at: the queue (oldest first) then trains them in scan order.
                _insert_run(c, run_id, run_name, config, run_dir, now + i * 1e-6, sweep_id)
        return self.get_sweep(sweep_id)

    def get_sweep(self, sweep_id: str) -> Sweep:
        rows = self._query("SELECT * FROM sweeps WHERE id = ?", (sweep_id,))
        if not rows:
            raise SweepNotFound(sweep_id)
        return _row_to_sweep(rows[0])

    def list_sweeps(self) -> list[Sweep]:
        """Newest first."""
        return [_row_to_sweep(r) for r in self._query("SELECT * FROM sweeps ORDER BY created_at DESC, rowid DESC")]

    def runs_of_sweep(self, sweep_id: str, include_long: bool = True) -> list[Run]:
        """The sweep's runs still in the store, scan order first, then its long run (if promoted and
        `include_long`). Deleted runs are simply absent."""
        sweep = self.get_sweep(sweep_id)
        rows = self._query("SELECT * FROM runs WHERE sweep_id = ? ORDER BY created_at, rowid", (sweep_id,))
        runs = [_row_to_run(r) for r in rows]
        scan = [r for r in runs if r.id != sweep.long_run_id]
        long = [r for r in runs if r.id == sweep.long_run_id] if include_long else []
        return scan + long

    def set_sweep_long_run(self, sweep_id: str, run_id: str | None) -> Sweep:
        with self._tx() as c:
            cur = c.execute("UPDATE sweeps SET long_run_id = ? WHERE id = ?", (run_id, sweep_id))
            if cur.rowcount == 0:
                raise SweepNotFound(sweep_id)
        return self.get_sweep(sweep_id)

    # -- metrics ------------------------------------------------------------------------------
    def log_metrics(self, run_id: str, step: int, **values: float | None) -> None:
        """Record values at a step. Train and eval logs at the same step merge into one row."""
        bad = set(values) - set(METRIC_FIELDS)
        if bad:
            raise KeyError(f"Unknown metric fields: {sorted(bad)}")
        cols = ["run_id", "step", "time", *values]
        updates = ", ".join(f"{k} = COALESCE(excluded.{k}, {k})" for k in values) or "time = excluded.time"
        with self._tx() as c:
            c.execute(
                f"INSERT INTO metrics ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
                f" ON CONFLICT(run_id, step) DO UPDATE SET {updates}",
                (run_id, step, time.time(), *values.values()),
            )
            if values.get("loss") is not None:
                c.execute(
                    "UPDATE runs SET step = MAX(step, ?), final_loss = ? WHERE id = ?", (step, values["loss"], run_id)
                )
            else:
                c.execute("UPDATE runs SET step = MAX(step, ?) WHERE id = ?", (step, run_id))

    def metrics(self, run_id: str, after_step: int = -1) -> list[Metric]:
        rows = self._query("SELECT * FROM metrics WHERE run_id = ? AND step > ? ORDER BY step", (run_id, after_step))
        return [Metric(**{k: r[k] for k in dict(r) if k != "run_id"}) for r in rows]

    def truncate_metrics(self, run_id: str, after_step: int) -> int:
        """Drop points past a checkpoint before resuming from it, so the curve continues cleanly."""
        with self._tx() as c:
            cur = c.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", (run_id, after_step))
            c.execute("UPDATE runs SET step = ? WHERE id = ?", (after_step, run_id))
            return cur.rowcount

    # -- events -------------------------------------------------------------------------------
    def add_event(self, run_id: str, message: str, level: str = "info") -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO events (run_id, time, level, message) VALUES (?, ?, ?, ?)",
                (run_id, time.time(), level, message),
            )

    def events(self, run_id: str, after_id: int = 0) -> list[Event]:
        rows = self._query("SELECT * FROM events WHERE run_id = ? AND id > ? ORDER BY id", (run_id, after_id))
        return [Event(**dict(r)) for r in rows]


def _insert_run(
    c: sqlite3.Connection,
    run_id: str,
    name: str,
    config: dict[str, Any],
    run_dir: str,
    created_at: float,
    sweep_id: str | None,
) -> None:
    model = str(config.get("model", {}).get("source", ""))
    datasets = ",".join(config.get("data", {}).get("datasets", []))
    c.execute(
        "INSERT INTO runs (id, name, status, config, model, datasets, run_dir, created_at, sweep_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (run_id, name, RunStatus.QUEUED.value, json.dumps(config), model, datasets, run_dir, created_at, sweep_id),
    )


def _row_to_sweep(row: sqlite3.Row) -> Sweep:
    d = dict(row)
    d["base_config"] = json.loads(d["base_config"])
    d["params"] = json.loads(d["params"])
    return Sweep(**d)


def _row_to_run(row: sqlite3.Row) -> Run:
    d = dict(row)
    d["status"] = RunStatus(d["status"])
    d["config"] = json.loads(d["config"])
    return Run(**d)


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")
