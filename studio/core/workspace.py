"""Where the workspace lives. Every path the studio writes is derived here, from STUDIO_HOME; every file
name inside a run's folder is owned by `RunDir`."""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

REPO_ROOT = Path(__file__).resolve().parents[2]


def studio_home() -> Path:
    """The workspace root: STUDIO_HOME, or ./workspace beside the project. Read at the edges only (the CLI,
    the server, a child process's main), through Workspace.from_env; the engine is handed the folder."""
    env = os.environ.get("STUDIO_HOME")
    home = Path(env).expanduser() if env else REPO_ROOT / "workspace"
    return home.resolve()


def ensure_home(home: Path) -> Path:
    for sub in ("datasets", "runs", "models"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    return home


def db_path(home: Path) -> Path:
    return home / "studio.db"


def runs_dir(home: Path) -> Path:
    return home / "runs"


def datasets_dir(home: Path) -> Path:
    return home / "datasets"


def models_cache_dir(home: Path | None = None) -> Path:
    """Converted models. STUDIO_MODEL_CACHE lets several workspaces (test runs) share one conversion; a
    model is machine-wide, so without a workspace at hand the default one's cache is meant."""
    env = os.environ.get("STUDIO_MODEL_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return (home or studio_home()) / "models"


@dataclass(frozen=True)
class Workspace:
    """Where the studio keeps everything (STUDIO_HOME) and the settings that come with the place. Built once
    at an edge by `Workspace.from_env()`; below it, the engine is handed `workspace.home`."""

    home: Path
    slots: int = 1  # CPU runs trained at once (STUDIO_SLOTS)
    min_free_mb: float = 200  # room a run needs for its checkpoints (STUDIO_MIN_FREE_MB)

    @classmethod
    def from_env(cls, home: Path | None = None) -> Workspace:
        """The workspace of this process: STUDIO_HOME (or `home`) and the STUDIO_* settings. Nothing is
        created: looking at a workspace never makes one (JobManager and the server make its folders)."""
        slots = os.environ.get("STUDIO_SLOTS", "1")
        free = os.environ.get("STUDIO_MIN_FREE_MB", "200")
        return cls(Path(home).resolve() if home else studio_home(), int(slots), float(free))

    @property
    def db(self) -> Path:
        return db_path(self.home)

    @property
    def runs(self) -> Path:
        return runs_dir(self.home)

    @property
    def datasets(self) -> Path:
        return datasets_dir(self.home)

    def run(self, run_id: str) -> RunDir:
        return RunDir(self.runs / run_id)


def bundled_datasets_dir() -> Path:
    """Sample datasets shipped with the project (data only, never a Python package)."""
    return REPO_ROOT / "datasets"


def presets_dir() -> Path:
    return REPO_ROOT / "presets"


# -- a run's folder ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    """A run's folder (RUNS/<run id>/) and the name of every file in it; nothing else spells them.

        config.yaml                  the run's config: written at submit, read by its worker
        log.txt                      the worker's output (and the training processes')
        abort-requested              an abort asked for, until the worker has stopped (resume removes it)
        data_facts.json              the coach's view of the data, written as the run starts
        checkpoints/checkpoint-N/    the Trainer's checkpoints (CHECKPOINT_FILES), resumable
        ranks/rank-N.json            what each process of a launched run did, written at its end
        eval/<stamp>.json, eval/latest.json    evaluation reports
        card/README.md, card/*.svg   the run card of a run with no adapter
        adapter/                     the final adapter (PEFT files, tokenizer), and beside them
            run.json                 what made it (written last: its presence means done)
            README.md, card/*.svg    the run card and its images

    `adapter_path` is where the store says the adapter is, when it says so (RunDir.of(run)); otherwise
    the adapter is RUN_DIR/adapter."""

    path: Path
    adapter_path: Path | None = None

    CONFIG: ClassVar[str] = "config.yaml"
    LOG: ClassVar[str] = "log.txt"
    DATA_FACTS: ClassVar[str] = "data_facts.json"
    CHECKPOINTS: ClassVar[str] = "checkpoints"
    CHECKPOINT_PREFIX: ClassVar[str] = "checkpoint-"
    RANKS: ClassVar[str] = "ranks"
    EVAL: ClassVar[str] = "eval"
    EVAL_LATEST: ClassVar[str] = "latest.json"
    # An abort request kept on disk: the worker checks it at every step as well as taking SIGTERM, so an
    # abort is honoured even when the signal is missed (sent while the worker was still starting, or to a
    # launched run's processes); resume removes it.
    ABORT_REQUEST: ClassVar[str] = "abort-requested"
    ADAPTER: ClassVar[str] = "adapter"
    RUN_JSON: ClassVar[str] = "run.json"
    CARD: ClassVar[str] = "README.md"
    CARD_IMAGES: ClassVar[str] = "card"
    # What makes a folder a usable PEFT adapter: its config and its weights in either format.
    ADAPTER_CONFIG: ClassVar[str] = "adapter_config.json"
    ADAPTER_WEIGHTS: ClassVar[tuple[str, ...]] = ("adapter_model.safetensors", "adapter_model.bin")
    # What a checkpoint needs to be resumed from: the adapter weights, the trainer state, the optimizer.
    CHECKPOINT_FILES: ClassVar[tuple[str, ...]] = ("adapter_model.safetensors", "trainer_state.json", "optimizer.pt")

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.adapter_path is not None:
            object.__setattr__(self, "adapter_path", Path(self.adapter_path))

    @classmethod
    def of(cls, run: Any) -> RunDir:
        """The folder of a store row (a `Run`): its run_dir, and its adapter_dir when it has one."""
        return cls(Path(run.run_dir), Path(run.adapter_dir) if run.adapter_dir else None)

    @property
    def abort_request(self) -> Path:
        return self.path / self.ABORT_REQUEST

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def log(self) -> Path:
        return self.path / self.LOG

    @property
    def data_facts(self) -> Path:
        return self.path / self.DATA_FACTS

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def ranks(self) -> Path:
        return self.path / self.RANKS

    def rank_report(self, rank: int) -> Path:
        return self.ranks / f"rank-{rank}.json"

    def rank_reports(self) -> list[Path]:
        return sorted(self.ranks.glob("rank-*.json"))

    @property
    def eval(self) -> Path:
        return self.path / self.EVAL

    @property
    def eval_latest(self) -> Path:
        return self.eval / self.EVAL_LATEST

    @property
    def adapter(self) -> Path:
        return self.adapter_path if self.adapter_path is not None else self.path / self.ADAPTER

    @property
    def run_json(self) -> Path:
        return self.adapter / self.RUN_JSON

    def card_folder(self, beside_adapter: bool) -> Path:
        """Where README.md goes: the adapter folder, or RUN_DIR/card/ for a run with no adapter."""
        return self.adapter if beside_adapter else self.path / self.CARD_IMAGES

    def card_images(self, beside_adapter: bool) -> Path:
        """The card's images: <adapter>/card/, or RUN_DIR/card/ itself beside its README.md."""
        return self.adapter / self.CARD_IMAGES if beside_adapter else self.path / self.CARD_IMAGES

    @staticmethod
    def is_adapter(path: Path | str | None) -> bool:
        """THE check for "is this a usable adapter folder?": adapter_config.json and the weights."""
        if not path:
            return False
        path = Path(path)
        return (path / RunDir.ADAPTER_CONFIG).is_file() and any((path / f).is_file() for f in RunDir.ADAPTER_WEIGHTS)

    def has_adapter(self) -> bool:
        return self.is_adapter(self.adapter)

    def checkpoint_dirs(self) -> list[Path]:
        """The run's checkpoint folders, newest (highest step) first; damaged ones included."""
        if not self.checkpoints.is_dir():
            return []
        found = [
            p
            for p in self.checkpoints.glob(f"{self.CHECKPOINT_PREFIX}*")
            if p.is_dir() and p.name.split("-")[-1].isdigit()
        ]
        return sorted(found, key=checkpoint_step, reverse=True)

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that can be resumed from, or None."""
        return next((p for p in self.checkpoint_dirs() if checkpoint_problem(p) is None), None)


def checkpoint_step(path: Path | str) -> int:
    """The step a checkpoint folder (checkpoint-N) was saved at."""
    return int(Path(path).name.split("-")[-1])


def checkpoint_problem(path: Path | str) -> str | None:
    """THE checkpoint check: why a checkpoint cannot be resumed from (missing or unreadable parts), or None
    if it is whole."""
    path = Path(path)
    missing = [f for f in RunDir.CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is not valid JSON"
    try:
        from safetensors import safe_open

        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            list(f.keys())
    except Exception:  # noqa: BLE001 - safetensors raises several types for a damaged file
        return "adapter_model.safetensors is unreadable"
    if not zipfile.is_zipfile(path / "optimizer.pt"):  # torch.save writes a zip archive
        return "optimizer.pt is truncated or corrupt"
    return None
