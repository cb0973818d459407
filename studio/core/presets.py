"""Presets are data: YAML files, each a partial RunConfig merged over the defaults.

The project's own presets live in presets/ (read-only for the studio); the ones a user saves from the
form live in STUDIO_HOME/presets/, so saving never writes into the installed project.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from studio.core.config import ConfigError, RunConfig, merge_dicts
from studio.core.workspace import presets_dir, studio_home

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    overrides: dict
    path: Path

    def to_config(self) -> RunConfig:
        return RunConfig.from_dict(merge_dicts(RunConfig().to_dict(), self.overrides))


def _read(path: Path) -> Preset:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"Preset '{path.name}' is not valid YAML: {err}"]) from err
    if not isinstance(data, dict):
        raise ConfigError([f"Preset '{path.name}' must be a mapping of sections."])
    description = str(data.pop("description", ""))
    preset = Preset(path.stem, description, data, path)
    preset.to_config()  # unknown keys and wrong shapes fail here, with the key named
    return preset


def user_presets_dir() -> Path:
    return studio_home() / "presets"


def _preset_files(directory: Path | None) -> list[Path]:
    """One directory when given; else the project's presets, then the user's (built-in names win)."""
    dirs = [directory] if directory is not None else [presets_dir(), user_presets_dir()]
    found: dict[str, Path] = {}
    for d in dirs:
        for path in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            found.setdefault(path.stem, path)
    return list(found.values())


def list_presets(directory: Path | None = None) -> list[Preset]:
    return [_read(p) for p in _preset_files(directory)]


def preset_names(directory: Path | None = None) -> list[str]:
    return [p.stem for p in _preset_files(directory)]


def load_preset(name_or_path: str, directory: Path | None = None) -> RunConfig:
    """A preset by name ('quick-demo') or by path, as a full RunConfig."""
    given = Path(name_or_path).expanduser()
    by_name = not given.suffix and not given.is_file()
    if by_name:
        files = {p.stem: p for p in _preset_files(directory)}
        path = files.get(name_or_path, Path(f"{name_or_path}.yaml"))
    else:
        path = given
    if not path.is_file():
        if not by_name:
            raise ConfigError([f"Config file '{name_or_path}' does not exist."])
        names = ", ".join(preset_names(directory)) or "none"
        raise ConfigError([f"No preset '{name_or_path}'. Available presets: {names}."])
    return _read(path).to_config()


def save_preset(config: RunConfig, name: str, description: str = "", directory: Path | None = None) -> Path:
    """Save a form as a preset: only the values that differ from the defaults, so presets stay readable."""
    if not _NAME.fullmatch(name):
        raise ConfigError([f"Preset name '{name}' is not allowed: use letters, digits, '-', '_' or '.' only."])
    if directory is None:
        if (presets_dir() / f"{name}.yaml").is_file():
            raise ConfigError([f"'{name}' is a built-in preset; save yours under another name."])
        directory = user_presets_dir()
    directory.mkdir(parents=True, exist_ok=True)
    overrides = _diff(RunConfig().to_dict(), config.to_dict())
    body = {"description": description, **overrides} if description else overrides
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _diff(base: dict, new: dict) -> dict:
    out: dict = {}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            sub = _diff(base[key], value)
            if sub:
                out[key] = sub
        elif base.get(key) != value:
            out[key] = value
    return out
