"""Where the workspace lives. Every path the studio writes is derived here, from STUDIO_HOME."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def studio_home() -> Path:
    """The workspace root: STUDIO_HOME, or ./workspace beside the project."""
    env = os.environ.get("STUDIO_HOME")
    home = Path(env).expanduser() if env else REPO_ROOT / "workspace"
    return home.resolve()


def ensure_home(home: Path | None = None) -> Path:
    home = home or studio_home()
    for sub in ("datasets", "runs", "models"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    return home


def db_path(home: Path | None = None) -> Path:
    return (home or studio_home()) / "studio.db"


def runs_dir(home: Path | None = None) -> Path:
    return (home or studio_home()) / "runs"


def datasets_dir(home: Path | None = None) -> Path:
    return (home or studio_home()) / "datasets"


def models_cache_dir(home: Path | None = None) -> Path:
    """Converted models. STUDIO_MODEL_CACHE lets several workspaces (test runs) share one conversion."""
    env = os.environ.get("STUDIO_MODEL_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return (home or studio_home()) / "models"


def bundled_datasets_dir() -> Path:
    """Sample datasets shipped with the project (data only, never a Python package)."""
    return REPO_ROOT / "datasets"


def presets_dir() -> Path:
    return REPO_ROOT / "presets"
