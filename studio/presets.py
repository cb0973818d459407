"""Presets are data: presets/*.yaml, each a partial RunConfig merged over the defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from studio.config import ConfigError, RunConfig, merge_dicts
from studio.paths import presets_dir

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


def list_presets(directory: Path | None = None) -> list[Preset]:
    directory = directory or presets_dir()
    return [_read(p) for p in sorted(directory.glob("*.yaml"))]


def preset_names(directory: Path | None = None) -> list[str]:
    return [p.stem for p in sorted((directory or presets_dir()).glob("*.yaml"))]


def load_preset(name_or_path: str, directory: Path | None = None) -> RunConfig:
    """A preset by name ('quick-demo') or by path, as a full RunConfig."""
    given = Path(name_or_path).expanduser()
    by_name = not given.suffix and not given.is_file()
    path = (directory or presets_dir()) / f"{name_or_path}.yaml" if by_name else given
    if not path.is_file():
        if not by_name:
            raise ConfigError([f"Config file '{name_or_path}' does not exist."])
        names = ", ".join(preset_names(directory)) or "none"
        raise ConfigError([f"No preset '{name_or_path}'. Available presets: {names}."])
    return _read(path).to_config()


def save_preset(config: RunConfig, name: str, description: str = "", directory: Path | None = None) -> Path:
    """Save a form as a preset: only the values that differ from the defaults, so presets stay readable."""
    if not _NAME.match(name):
        raise ConfigError([f"Preset name '{name}' is not allowed: use letters, digits, '-', '_' or '.' only."])
    directory = directory or presets_dir()
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
