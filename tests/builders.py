"""Run configs for tests: one builder instead of one per test file.

A small run on the bundled studio-facts data: cutoff 64, LoRA r=4 (alpha 8), batch 4 without
accumulation, a log line every step, one CPU thread (the CI machine has two cores and tests may share
them). Each keyword is a config section whose fields override these, e.g.
`small_run_config(model_dir, "scan", train={"max_steps": 6}, data={"val_size": 0.2})`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.core.config import RunConfig

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"datasets": ["studio-facts"], "cutoff_len": 64},
    "lora": {"r": 4, "alpha": 8},
    "train": {
        "max_steps": 4,
        "batch_size": 4,
        "grad_accum": 1,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "num_threads": 1,
    },
}


def small_run_config(source: str | Path, name: str = "tiny", **sections: dict[str, Any]) -> RunConfig:
    cfg = RunConfig(name=name)
    cfg.model.source = str(source)
    for section in DEFAULTS.keys() | sections.keys():
        spec = getattr(cfg, section)
        for key, value in {**DEFAULTS.get(section, {}), **sections.get(section, {})}.items():
            if not hasattr(spec, key):
                raise AttributeError(f"{section}.{key} is not a config field")
            setattr(spec, key, value)
    return cfg
