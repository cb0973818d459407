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


@pytest.mark.parametrize(
    ("stage", "dataset"), [("dpo", "studio-prefs"), ("kto", "studio-kto"), ("orpo", "studio-prefs")]
)
def test_each_stage_trains_on_a_4bit_base(home, tiny_model_dir, stage, dataset):
    """QLoRA for every stage: the reference pass (the same 4-bit weights with the adapter off) and the
    trained pass both run, and every LoRA B left zero got gradients."""
    from safetensors.torch import load_file

    data = {"datasets": [dataset], "cutoff_len": 96}
    config = small_run_config(tiny_model_dir, data=data, train={"max_steps": 2, "learning_rate": 1e-3})
    config.stage = stage
    config.quant.mode, config.quant.compute_dtype = "4bit", "fp32"
    sink = Sink()
    result = run_training(config, home / "runs" / "q1", sink, home=home)

    assert result.status == "completed" and result.global_step == 2
    assert any("base in 4bit" in e for e in sink.events)
    losses = [values["loss"] for _, values in sink.logs if "loss" in values]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    weights = load_file(Path(result.adapter_dir) / "adapter_model.safetensors")
    norms = [w.norm().item() for name, w in weights.items() if "lora_B" in name]
    assert norms and all(n > 0 for n in norms)


def test_evaluate_ranks_the_held_out_pairs_with_and_without_the_adapter(home, tiny_model_dir):
    """A finished DPO run's evaluation: loss and generations on the chosen answers, and the held-out pairs
    ranked by the base (adapter off) and by the adapter; the report and its summary carry both."""
    from studio.core.store import RunStatus, Store
    from studio.core.workspace import RunDir, db_path
    from studio.reports.evaluate import EvalSpec, evaluate_run, summary_table

    data = {"datasets": ["studio-prefs"], "cutoff_len": 128, "val_size": 0.2}
    config = small_run_config(tiny_model_dir, data=data, train={"max_steps": 4, "eval_steps": 4, "learning_rate": 5e-3})
    config.stage = "dpo"
    store = Store(db_path(home))
    run_dir = home / "runs" / "dpo-1"
    store.create_run("dpo-1", "dpo", config.to_dict(), str(run_dir))
    run_dir.mkdir(parents=True)
    config.save(RunDir(run_dir).config)
    store.transition("dpo-1", RunStatus.RUNNING)
    result = run_training(config, run_dir, Sink(), home=home)
    store.transition("dpo-1", RunStatus.COMPLETED, adapter_dir=result.adapter_dir)

    report = evaluate_run(EvalSpec("dpo-1", max_samples=14, gen_samples=2, max_new_tokens=8), home)
    pref = report.preference
    assert pref is not None and pref.pairs == 14  # the run's own held-out pairs (a fifth of 72)
    assert 0 <= pref.accuracy.base <= 1 and 0 <= pref.accuracy.adapter <= 1
    assert pref.margin.adapter > pref.margin.base  # DPO moved the held-out margin the chosen way
    assert report.generation.prompts == 2 and report.samples > 0
    metrics = [row["metric"] for row in summary_table(report)]
    assert metrics[-2:] == ["preference accuracy (0-1)", "preference margin (nats)"]
