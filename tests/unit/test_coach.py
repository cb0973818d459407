"""The training coach on synthetic curves: each rule fires on a curve that has its problem, at its threshold,
and stays quiet on a healthy run (a falling loss with noise)."""

from __future__ import annotations

import json
import math
import random

import pytest

from studio.core.config import RunConfig
from studio.core.store import Metric, RunStatus, Store
from studio.core.workspace import RunDir
from studio.training.coach import (
    Advice,
    DataFacts,
    Point,
    advice_for_run,
    advise,
    data_advice,
    data_facts,
    diverged,
    divergence_stop,
    early_stop_due,
    eos_missing_share,
    exploding,
    gradients_exploding,
    heavy_truncation,
    loss_not_falling,
    never_ends,
    overfitting,
    points_from_log_history,
    points_from_metrics,
    read_data_facts,
    tiny_data_high_rank,
)

EOS = 2


def config(**train) -> RunConfig:
    cfg = RunConfig()
    cfg.data.datasets = ["studio-facts"]
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def healthy(seed: int, steps: int = 300, every: int = 5, eval_every: int = 25) -> list[Point]:
    """A run that learns: loss falling from ~2.4 towards 0.6 with batch noise, steady gradient norms, an eval
    loss that falls and flattens."""
    rng = random.Random(seed)
    points = []
    for step in [1, *range(every, steps + 1, every)]:
        loss = 0.6 + 1.8 * math.exp(-step / 60) + rng.gauss(0, 0.06)
        ev = 0.7 + 1.8 * math.exp(-step / 60) + rng.gauss(0, 0.002) if step % eval_every == 0 else None
        points.append(Point(step, loss, ev, grad_norm=0.8 + rng.gauss(0, 0.15), learning_rate=2e-4))
    return points


def curve(losses, start: int = 1, every: int = 1, grad_norms=None) -> list[Point]:
    norms = grad_norms or [1.0] * len(losses)
    return [Point(start + i * every, x, grad_norm=g) for i, (x, g) in enumerate(zip(losses, norms, strict=True))]


FACTS_OK = DataFacts(samples=5000, truncated_share=0.01, eos_missing_share=0.0, dropped=0, cutoff_len=1024)


# -- a healthy run is quiet ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("finished", [False, True])
def test_a_healthy_run_gets_no_advice(seed, finished):
    points = healthy(seed)
    assert advise(points, FACTS_OK, config(), finished=finished) == []
    for n in (1, 3, 10, 40):  # and at any moment while it runs
        assert advise(points[:n], FACTS_OK, config()) == []


# -- divergence ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "word"), [(math.nan, "NaN"), (math.inf, "infinite")])
def test_a_nan_or_inf_loss_is_divergence_at_its_step(bad, word):
    points = healthy(0, steps=100)
    points[12] = Point(points[12].step, bad)
    advice = diverged(points)
    assert advice is not None and advice.severity == "critical" and advice.step == points[12].step
    assert word in advice.detail and "train.learning_rate" in advice.fix and "lora.alpha" in advice.fix
    assert divergence_stop(points) == advice
    assert diverged(healthy(0, steps=100)) is None


def test_an_exploding_loss_needs_three_logs_above_twice_the_start():
    start = [2.0, 2.0, 2.0]
    assert exploding(curve([*start, 4.1, 4.2])) is None  # two logs: could still be a spike
    advice = exploding(curve([*start, 4.1, 4.2, 4.3]))
    assert advice is not None and advice.severity == "critical" and advice.step == 4
    assert "2" in advice.detail and "4.3" in advice.detail and "train.learning_rate" in advice.fix
    assert exploding(curve([*start, 4.0, 4.0, 4.0])) is None  # at the limit, not above it
    assert exploding(curve([*start, 5.0, 5.0, 3.0])) is None  # came back
    assert divergence_stop(curve([*start, 5.0, 9.0, 30.0])) is not None


def test_a_run_that_blows_up_by_its_second_log_is_still_caught():
    # The bundled model at lr 0.9 (measured): 2.69, 3.22, 15.2, 34.8, 19.7, 36.2
    losses = [2.69, 3.22, 15.2, 34.8, 19.7, 36.2]
    advice = exploding(curve(losses))
    assert advice is not None and advice.step == 3  # the climb began at step 3, not where 3 logs were reached
    assert exploding(curve([2.7, 15.0, 35.0, 20.0, 20.0, 16.0])) is not None  # 15 is not taken as the start


def test_a_low_starting_loss_needs_a_full_nat_to_explode():
    # 2x of 0.3 is noise-sized: the limit is start + 1 nat.
    assert exploding(curve([0.3, 0.3, 0.3, 0.9, 1.1, 1.2])) is None
    assert exploding(curve([0.3, 0.3, 0.3, 1.4, 1.5, 1.6])) is not None


def test_gradients_blowing_up_warns_and_says_about_clipping():
    base = [1.0] * 5
    assert gradients_exploding(curve([2.0] * 8, grad_norms=[*base, 9.9, 10.0, 12.0])) is None
    advice = gradients_exploding(curve([2.0] * 8, grad_norms=[*base, 10.0, 50.0, 12.0]), config(max_grad_norm=1.0))
    assert advice is not None and advice.severity == "warning" and advice.step == 6
    assert "holding" in advice.fix
    norms = [*base, math.nan, math.inf, math.inf]
    off = gradients_exploding(curve([2.0] * 8, grad_norms=norms), config(max_grad_norm=0))
    assert off is not None and "train.max_grad_norm 0.3-1.0" in off.fix
    assert gradients_exploding(curve([2.0] * 8, grad_norms=[*base, 20.0, 20.0, 2.0])) is None  # settled


def test_a_diverged_run_gets_only_the_divergence():
    points = curve([2.0] * 40 + [math.nan] * 5)
    found = advise(points, FACTS_OK, config(learning_rate=1e-6))
    assert [a.rule for a in found] == ["diverged"]  # not also "the loss is not falling"


# -- loss not falling ---------------------------------------------------------------------------------------


def flat(level: float, steps: int = 60, seed: int = 0) -> list[Point]:
    rng = random.Random(seed)
    return curve([level + rng.gauss(0, 0.03) for _ in range(steps // 5)], start=5, every=5)


@pytest.mark.parametrize(
    ("lr", "needle"),
    [(1e-5, "Raise train.learning_rate"), (5e-3, "Lower train.learning_rate"), (2e-4, "chat template")],
)
def test_a_flat_loss_is_flagged_with_the_likely_cause(lr, needle):
    advice = loss_not_falling(flat(2.0), config(learning_rate=lr))
    assert advice is not None and advice.severity == "warning"
    assert needle in advice.fix and "2" in advice.detail
    if lr == 2e-4:
        assert "lora.target_modules" in advice.fix


def test_loss_not_falling_waits_for_min_steps_and_measures_five_percent():
    assert loss_not_falling(flat(2.0, steps=25), config()) is None  # too early to tell
    assert loss_not_falling(flat(2.0, steps=60), config(), min_steps=100) is None
    # first quarter 2.0, last quarter 1.9: exactly 5% off is learning; 4.9% is not
    assert loss_not_falling(curve([2.0, 2.0, 1.95, 1.95, 1.9, 1.9], start=10, every=10), config()) is None
    assert loss_not_falling(curve([2.0, 2.0, 1.95, 1.95, 1.902, 1.902], start=10, every=10), config()) is not None
    assert loss_not_falling(flat(0.1), config()) is None  # already fitted: nothing left to fall


# -- overfitting and early stopping -----------------------------------------------------------------------------


def with_evals(evals: list[float], train_from: float = 2.0, train_step: float = -0.05) -> list[Point]:
    points = []
    for i, ev in enumerate(evals):
        step = 10 * (i + 1)
        points.append(Point(step - 5, train_from + train_step * (2 * i)))
        points.append(Point(step, train_from + train_step * (2 * i + 1), ev))
    return points


def test_overfitting_is_eval_rising_twice_while_train_falls():
    advice = overfitting(with_evals([1.0, 0.9, 0.85, 0.87, 0.9]))
    assert advice is not None and advice.severity == "warning" and advice.step == 40
    assert "0.85" in advice.detail and "step 30" in advice.detail
    assert "train.early_stopping_patience" in advice.fix and "lora.dropout" in advice.fix and "lora.r" in advice.fix
    assert overfitting(with_evals([1.0, 0.9, 0.85, 0.87])) is None  # one rise
    assert overfitting(with_evals([1.0, 0.9, 0.85, 0.853, 0.855])) is None  # within 1%: noise
    assert overfitting(with_evals([1.0, 0.9, 0.85, 0.87, 0.9], train_step=+0.05)) is None  # train rising too
    assert overfitting(with_evals([1.0, 0.9, 0.85, 0.87, 0.9]), finished=True).fix.startswith("Use the checkpoint")


def test_early_stop_due_counts_evaluations_without_improvement():
    assert early_stop_due([1.0, 0.9, 0.95, 0.96], patience=2)
    assert not early_stop_due([1.0, 0.9, 0.95, 0.96], patience=3)
    assert not early_stop_due([1.0, 0.9, 0.95, 0.89], patience=2)  # improved at the last one
    assert not early_stop_due([1.0, 0.9, 0.95, 0.96], patience=0)  # 0 = off
    assert not early_stop_due([1.0, 0.99, 0.985], patience=2)
    assert early_stop_due([1.0, 0.99, 0.985], patience=2, min_delta=0.02)  # too small to count
    assert early_stop_due([1.0, math.nan, math.nan], patience=2)  # NaN never improves
    assert not early_stop_due([1.0, 0.9], patience=2)
    assert early_stop_due([1.0, 0.9, 0.9, 0.9], patience=2)  # equal is not better


# -- data ---------------------------------------------------------------------------------------------------


def test_eos_missing_share_reads_the_last_trained_label():
    ign = -100
    seqs = [[ign, 5, EOS], [ign, 5, 6], [ign, 5, EOS, ign], [ign, ign], [7]]
    assert eos_missing_share(seqs, EOS) == pytest.approx(2 / 4)  # the all-masked sample teaches nothing
    assert eos_missing_share(seqs, None) == 1.0
    assert eos_missing_share([], EOS) == 0.0
    facts = data_facts(seqs, EOS, truncated=1, dropped=3, cutoff_len=64)
    assert facts == DataFacts(5, 0.2, 0.5, 3, 64)
    assert DataFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts


def facts(**kw) -> DataFacts:
    return DataFacts(**{**FACTS_OK.__dict__, **kw})


def test_never_ends_at_five_percent_and_critical_at_half():
    assert never_ends(facts(eos_missing_share=0.049)) is None
    warn = never_ends(facts(eos_missing_share=0.05))
    assert warn is not None and warn.severity == "warning" and "250 of 5000" in warn.detail
    assert "EOS" in warn.fix and "chat template" in warn.fix  # not from the cutoff: the template lacks EOS
    crit = never_ends(facts(eos_missing_share=0.5, truncated_share=0.5))
    assert crit is not None and crit.severity == "critical" and "data.cutoff_len" in crit.fix


def test_heavy_truncation_counts_cut_and_dropped_samples():
    assert heavy_truncation(facts(truncated_share=0.09)) is None
    advice = heavy_truncation(facts(truncated_share=0.10))
    assert advice is not None and advice.severity == "warning" and "500 of 5000" in advice.detail
    assert "data.cutoff_len=1024" in advice.detail and "data.cutoff_len" in advice.fix
    dropped = heavy_truncation(facts(samples=90, truncated_share=0.0, dropped=10))
    assert dropped is not None and "10 of 100" in dropped.detail and "10 had no answer token" in dropped.detail
    assert heavy_truncation(facts(truncated_share=0.5)).severity == "critical"


def test_a_high_rank_on_a_small_dataset():
    high = config()
    high.lora.r = 64
    advice = tiny_data_high_rank(facts(samples=999), high)
    assert advice is not None and "lora.r=64" in advice.detail and "999 samples" in advice.detail
    assert "lora.r 8-16" in advice.fix
    assert tiny_data_high_rank(facts(samples=1000), high) is None
    high.lora.r = 32
    assert tiny_data_high_rank(facts(samples=200), high) is None


def test_eos_lost_to_the_cutoff_is_said_once_under_truncation():
    both = data_advice(facts(truncated_share=0.6, eos_missing_share=0.55), config())
    assert [(a.rule, a.severity) for a in both] == [("heavy_truncation", "critical")]
    apart = data_advice(facts(truncated_share=0.2, eos_missing_share=0.5), config())  # EOS lost elsewhere too
    assert {a.rule for a in apart} == {"heavy_truncation", "never_ends"}


def test_advise_puts_the_most_severe_first():
    points = curve([2.0] * 40 + [math.nan])
    high = config()
    high.lora.r = 128
    found = advise(points, facts(samples=300, truncated_share=0.2), high, finished=True)
    assert [a.severity for a in found] == ["critical", "warning", "warning"]
    assert found[0].rule == "diverged"
    assert all(isinstance(a, Advice) and a.to_dict()["rule"] == a.rule for a in found)


# -- reading a run --------------------------------------------------------------------------------------------


def test_log_history_becomes_one_point_per_step_with_nan_kept():
    history = [
        {"loss": 2.0, "grad_norm": 1.0, "learning_rate": 1e-4, "epoch": 0.1, "step": 1},
        {"loss": math.nan, "grad_norm": math.nan, "learning_rate": 1e-4, "step": 2},
        {"eval_loss": 1.5, "eval_runtime": 0.1, "step": 2},
        {"train_runtime": 3.0, "train_loss": 2.0, "step": 2},
    ]
    points = points_from_log_history(history)
    assert [p.step for p in points] == [1, 2]
    assert math.isnan(points[1].loss) and points[1].eval_loss == 1.5 and points[0].learning_rate == 1e-4
    assert diverged(points).step == 2


def test_store_rows_get_their_nan_loss_back():
    rows = [
        Metric(step=1, time=0, loss=2.0, learning_rate=1e-4),
        Metric(step=2, time=0, loss=None, learning_rate=1e-4, memory_mb=100.0),  # SQLite turned NaN into NULL
        Metric(step=3, time=0, eval_loss=1.2),  # an eval-only row has no train loss at all
    ]
    points = points_from_metrics(rows)
    assert math.isnan(points[1].loss) and points[2].loss is None and points[2].eval_loss == 1.2


def test_advice_for_a_run_in_the_store(tmp_path):
    store = Store(tmp_path / "studio.db")
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    cfg = config(learning_rate=0.9)
    run = store.create_run("r1", "r1", cfg.to_dict(), str(run_dir))
    store.transition("r1", RunStatus.RUNNING)
    for step, loss in enumerate([2.5, 2.4, 2.6, math.nan], start=1):
        store.log_metrics("r1", step, loss=loss, learning_rate=0.9, memory_mb=10.0)
    assert [a.rule for a in advice_for_run(store, store.get_run("r1"))] == ["diverged"]
    assert read_data_facts(run_dir) is None  # not written yet: the data rules stay quiet
    RunDir(run_dir).data_facts.write_text(json.dumps(facts(truncated_share=0.3).to_dict()))
    store.transition("r1", RunStatus.FAILED, error="diverged")
    found = advice_for_run(store, store.get_run(run.id))
    assert [a.rule for a in found] == ["diverged", "heavy_truncation"]
    assert "NaN" in found[0].detail and found[0].step == 4


# -- the settings -------------------------------------------------------------------------------------------


def test_early_stopping_needs_a_validation_split():
    cfg = config(early_stopping_patience=3)
    problems = cfg.validate()
    assert [p.path for p in problems] == ["train.early_stopping_patience"]
    assert "data.val_size" in str(problems[0]) and "early_stopping_patience" in str(problems[0])  # the fix names both
    cfg.data.val_size = 0.1
    assert cfg.validate() == []
    assert [p.path for p in config(early_stopping_patience=-1).validate()] == ["train.early_stopping_patience"]
    assert RunConfig().train.stop_on_divergence is True and RunConfig().train.early_stopping_patience == 0


def test_a_stopped_run_loses_the_checkpoints_of_its_diverged_state(tmp_path):
    from studio.training.loop import _divergence_message

    def checkpoint(step: int) -> None:  # a whole one: readable weights, trainer state and optimizer archive
        import torch
        from safetensors.torch import save_file

        path = tmp_path / "checkpoints" / f"checkpoint-{step}"
        path.mkdir(parents=True)
        save_file({"w": torch.zeros(1)}, str(path / "adapter_model.safetensors"))
        (path / "trainer_state.json").write_text("{}")
        torch.save({}, path / "optimizer.pt")

    for step in (2, 4, 6):
        checkpoint(step)
    points = curve([2.7, 3.2, 15.2, 34.8, 19.7, 36.2])
    message = _divergence_message(exploding(points), 6, tmp_path, points)
    # loss 15.2 at step 3 came from the weights after step 2: checkpoint-2 is already broken
    assert [p.name for p in RunDir(tmp_path).checkpoint_dirs()] == []
    assert message.startswith("Stopped at step 6 because the loss is exploding")
    assert "checkpoint-2" in message and "train.learning_rate" in message
    checkpoint(1)
    assert "The last good checkpoint is checkpoint-1" in _divergence_message(exploding(points), 6, tmp_path, points)


# -- the training callback --------------------------------------------------------------------------------------


class ListSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.logged: list[int] = []

    def log(self, step: int, **values) -> None:
        self.logged.append(step)

    def event(self, message: str, level: str = "info") -> None:
        self.events.append((level, message))

    def progress(self, step: int, total: int) -> None:
        pass


def replay(cfg: RunConfig, history: list[dict]):
    """Feed log entries to the studio callback as the Trainer does (history first, then on_log); the control
    flags as the step left them (a save and an eval were due)."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    from studio.training.callbacks import StudioCallback
    from studio.training.meter import TokenCounter

    sink = ListSink()
    callback = StudioCallback(sink, lambda: False, TokenCounter(), "cpu", cfg)
    state = SimpleNamespace(log_history=[], global_step=0, epoch=0.0, max_steps=100)
    control = TrainerControl()
    for entry in history:
        state.global_step = entry["step"]
        state.log_history.append(entry)
        control = TrainerControl(should_save=True, should_evaluate=True)
        logs = {k: v for k, v in entry.items() if k != "step"}
        control = callback.on_log(None, state, control, logs=logs) or control
        if control.should_training_stop:
            break
    return callback, control, sink


def test_the_callback_stops_a_nan_run_without_saving_or_evaluating_it():
    history = [{"loss": 2.0, "grad_norm": 1.0, "learning_rate": 1e-4, "step": s} for s in range(1, 5)]
    history += [{"loss": math.nan, "grad_norm": math.nan, "learning_rate": 1e-4, "step": 5}]
    history += [{"loss": 2.0, "learning_rate": 1e-4, "step": 6}]
    callback, control, sink = replay(config(), history)
    assert control.should_training_stop and not control.should_save and not control.should_evaluate
    assert callback.diverged is not None and callback.diverged.step == 5 and sink.logged == [1, 2, 3, 4, 5]
    assert [level for level, m in sink.events if m.startswith("Stopping the run: Training diverged (step 5)")] == [
        "error"
    ]

    off = config(stop_on_divergence=False)
    callback, control, sink = replay(off, history)
    assert not control.should_training_stop and callback.diverged is None and sink.logged == [1, 2, 3, 4, 5, 6]
    assert sum("Training diverged" in m for _, m in sink.events) == 1  # said once, as an error, run goes on


def test_the_callback_says_each_finding_once_and_early_stops():
    flat_history = [{"loss": 2.0 + 0.01 * (s % 3), "learning_rate": 2e-4, "step": s} for s in range(5, 200, 5)]
    _, control, sink = replay(config(), flat_history)
    assert not control.should_training_stop
    assert [m.split(" (")[0] for _, m in sink.events] == ["The loss is not falling"]

    cfg = config(early_stopping_patience=2)
    cfg.data.val_size = 0.1
    evals = [1.0, 0.8, 0.7, 0.75, 0.72, 0.6]
    history = [{"eval_loss": e, "step": 10 * (i + 1)} for i, e in enumerate(evals)]
    callback, control, sink = replay(cfg, history)
    assert control.should_training_stop and callback.early_stop.step == 50 and callback.early_stop.best_step == 30
    assert (
        "info",
        "Early stopping at step 50: eval loss has not improved for 2 evaluations (best 0.7 at step 30)",
    ) in sink.events
    assert callback.restore_best() is None  # no model was handed over, so there is nothing to put back


# -- preference runs ------------------------------------------------------------------------------


def _preference_config(**preference) -> RunConfig:
    config = RunConfig.from_dict({"stage": "dpo", "train": {"max_steps": 60}, "preference": preference})
    return config


def test_pairs_ranked_right_by_a_wide_margin_early_say_beta_is_too_low():
    from studio.training.coach import Point, pairs_too_easy

    points = [Point(s, loss=0.1, reward_accuracy=1.0, reward_margin=2.0 * s) for s in range(2, 21, 2)]
    advice = pairs_too_easy(points, _preference_config(beta=0.05))
    assert advice is not None and advice.rule == "pairs_too_easy" and "preference.beta" in advice.fix
    assert "beta 0.05" in advice.detail and advice.step == 4  # margins 6 and 8 at steps 4 and 6: over 5
    late = [Point(s, loss=0.1, reward_accuracy=1.0 if s > 30 else 0.7, reward_margin=8.0) for s in range(2, 61, 2)]
    assert pairs_too_easy(late, _preference_config()) is None  # learnt by the end: that is the goal
    assert pairs_too_easy([Point(s, reward_accuracy=1.0, reward_margin=1.0) for s in range(1, 9)]) is None


def test_chosen_log_probs_falling_with_the_rejected_ones_is_named():
    from studio.training.coach import Point, chosen_displaced, curve_advice

    falling = [Point(s, loss=0.5, logps_chosen=-40.0 - s, logps_rejected=-45.0 - 3 * s) for s in range(1, 13)]
    advice = chosen_displaced(falling)
    assert advice is not None and "preference.start_from" in advice.fix and "fell from" in advice.detail
    held = [Point(s, loss=0.5, logps_chosen=-40.0 + 0.1 * s, logps_rejected=-45.0 - 3 * s) for s in range(1, 13)]
    assert chosen_displaced(held) is None
    rules = [a.rule for a in curve_advice(falling, _preference_config())]
    assert rules == ["chosen_displaced"]  # and not loss_not_falling: a preference loss reads differently
