"""Every preference stage trains through run_training on the tiny model (seconds each): TRL's trainer runs,
its metrics reach the sink under the store's names, and the saved adapter is the trained one only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from peft import PeftConfig

from studio.core.store import METRIC_FIELDS
from studio.training.loop import run_training
from tests.builders import small_run_config

pytestmark = pytest.mark.integration


class Sink:
    def __init__(self) -> None:
        self.logs: list[tuple[int, dict]] = []
        self.events: list[str] = []

    def event(self, message: str, level: str = "info") -> None:
        self.events.append(message)

    def log(self, step: int, **values) -> None:
        self.logs.append((step, values))

    def progress(self, step: int, total: int) -> None:
        pass


@pytest.mark.parametrize(
    ("stage", "dataset", "preference", "logged"),
    [
        ("dpo", "studio-prefs", {}, "reward_accuracy"),
        ("dpo", "studio-prefs", {"loss_type": "simpo", "beta": 2.0}, "reward_margin"),
        ("dpo", "studio-prefs", {"loss_type": "ipo"}, "reward_accuracy"),
        ("kto", "studio-kto", {}, "kl"),
        ("orpo", "studio-prefs", {}, "reward_accuracy"),
    ],
)
def test_each_stage_trains_logs_its_metrics_and_saves_one_adapter(
    home, tiny_model_dir, stage, dataset, preference, logged
):
    data = {"datasets": [dataset], "cutoff_len": 128, "val_size": 0.2}
    config = small_run_config(tiny_model_dir, data=data, train={"max_steps": 3, "eval_steps": 3})
    config.stage = stage
    for key, value in preference.items():
        setattr(config.preference, key, value)
    sink = Sink()
    result = run_training(config, home / "runs" / "r1", sink, home=home)

    assert result.status == "completed" and result.global_step == 3
    names = {name for _, values in sink.logs for name in values}
    assert names <= set(METRIC_FIELDS) and logged in names and "eval_loss" in names
    losses = [values["loss"] for _, values in sink.logs if "loss" in values]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert any(values.get("tokens_per_s") for _, values in sink.logs)
    adapter = Path(result.adapter_dir)
    assert PeftConfig.from_pretrained(adapter).r == 4 and not (adapter / "ref").exists()
    assert any(e.startswith("Data: 58 train") for e in sink.events)
