"""A real sweep on the bundled model: two ranks scanned in order by real worker processes, both learning
(eval loss falls), a summary with final losses and parameter counts, a pick with its reason, and the long
run promoted from it."""

from __future__ import annotations

import pytest

from studio.core.config import RunConfig
from studio.core.store import RunStatus
from studio.runs.sweep import parse_param
from tests.builders import small_run_config

pytestmark = pytest.mark.integration

LONG_STEPS = 8  # the base config's own length: the long run's
SCAN_STEPS = 6


def bundled_base() -> RunConfig:
    return small_run_config(
        "bundled",
        "bundled-sweep",
        data={"val_size": 0.2},
        train={
            "max_steps": LONG_STEPS,
            "batch_size": 2,
            "eval_steps": 2,
            "save_steps": 100,
            "learning_rate": 1e-3,
            "num_threads": 2,
        },
    )


def test_a_rank_sweep_on_the_bundled_model_scans_in_order_picks_and_promotes(jobs):
    sweep, runs = jobs.submit_sweep(bundled_base(), [parse_param("lora.r=8,2")], SCAN_STEPS, "ranks")
    assert [r.config["lora"]["r"] for r in runs] == [2, 8]  # cheapest first
    assert runs[0].status == RunStatus.RUNNING and runs[1].status == RunStatus.QUEUED  # one slot: in turn

    done = [jobs.wait(r.id, timeout=300) for r in runs]
    assert all(r.status == RunStatus.COMPLETED for r in done), [r.error for r in done]
    assert done[0].finished_at <= done[1].started_at  # the second started only once the first ended
    assert all(r.step == SCAN_STEPS for r in done)
    for run in done:  # both scan runs learn: eval loss at the end is below the first evaluation
        evals = [m.eval_loss for m in jobs.store.metrics(run.id) if m.eval_loss is not None]
        assert len(evals) >= 2 and evals[-1] < evals[0], (run.name, evals)

    _, rows, pick = jobs.sweep_summary(sweep.id)
    assert [r.values for r in rows] == [{"lora.r": 2}, {"lora.r": 8}]
    for r in rows:
        assert r.status == "completed" and r.final_train_loss is not None and r.final_eval_loss is not None
        assert r.seconds and r.seconds > 0 and r.peak_memory_mb and r.peak_memory_mb > 0
    assert rows[1].trainable_params == 4 * rows[0].trainable_params  # r=8 has four times r=2's
    assert pick is not None and pick.run_id in {r.run_id for r in rows} and pick.metric == "eval_loss"
    assert "eval loss" in pick.reason and f"{min(r.final_eval_loss for r in rows):.4f}" in pick.reason

    long = jobs.promote_sweep(sweep.id)
    cfg = RunConfig.from_dict(long.config)
    assert cfg.lora.r == pick.values["lora.r"] and cfg.lora.alpha == 2 * cfg.lora.r  # base alpha/r = 8/4
    assert cfg.train.max_steps == LONG_STEPS and cfg.train.eval_steps == 2  # the base's own settings
    assert jobs.store.get_sweep(sweep.id).long_run_id == long.id
    finished = jobs.wait(long.id, timeout=300)
    assert finished.status == RunStatus.COMPLETED and finished.step == LONG_STEPS, finished.error
