"""The studio's hooks into transformers' Trainer: progress and metrics to the sink, the stop request, the
coach's findings, early stopping with the best weights kept.

Imports transformers: the loop loads this module only when it builds a trainer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from studio.core.config import RunConfig
from studio.training.coach import Advice, curve_advice, divergence_stop, early_stop_due, points_from_log_history
from studio.training.launch import RankInfo, any_rank
from studio.training.meter import TokenCounter, finite, peak_memory_mb
from studio.training.sink import EVENT_LEVEL, MetricSink


@dataclass(frozen=True)
class EarlyStop:
    step: int  # where training stopped
    best_step: int
    best_eval_loss: float
    patience: int


# TRL's log keys -> the store's metric fields (studio.core.store.PREFERENCE_METRICS).
PREFERENCE_LOGS = {
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
    "logps/chosen": "logps_chosen",
    "logps/rejected": "logps_rejected",
    "kl": "kl",
    "eval_rewards/accuracies": "eval_reward_accuracy",
    "eval_rewards/margins": "eval_reward_margin",
}


class StudioCallback(TrainerCallback):
    """Metrics to the sink at each log; a stop request becomes save-then-stop at the next step. The coach
    reads every log: a diverged run stops at once without saving, early stopping ends a run whose eval loss
    stopped improving, and each other finding becomes an event once."""

    def __init__(
        self,
        sink: MetricSink,
        should_stop: Callable[[], bool],
        counter: TokenCounter,
        device: str,
        config: RunConfig | None = None,
        rank: RankInfo = RankInfo(),
    ) -> None:
        self.sink = sink
        self.should_stop = should_stop
        self.counter = counter
        self.device = device
        self.config = config
        self.rank = rank
        self.stop_on_divergence = config is None or config.train.stop_on_divergence
        self.patience = config.train.early_stopping_patience if config is not None else 0
        self.aborted = False
        self.diverged: Advice | None = None
        self.early_stop: EarlyStop | None = None
        self.points: list = []
        self._mark = (time.perf_counter(), 0)
        self._said: set[str] = set()
        self._best: tuple[int, list[tuple[Any, Any]]] | None = None  # (step, [(parameter, cpu copy)])

    # -- Trainer events ---------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark = (time.perf_counter(), self.counter.total)
        self.sink.progress(state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.sink.progress(state.global_step, state.max_steps)
        if self._stop_requested(args):
            self.aborted = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        logs = logs or {}
        values = self._metrics(logs)
        if values:
            values["epoch"] = finite(state.epoch)
            self.sink.log(state.global_step, **values)
            # The whole history (a resumed run's included) with raw floats: NaN stays visible here.
            self.points = points_from_log_history(state.log_history)
            self._coach(state, control, model, "eval_loss" in logs)
        return control

    # -- one thing each ---------------------------------------------------------------------------------

    def _stop_requested(self, args) -> bool:
        stop = self.should_stop()
        if self.rank.distributed:
            stop = any_rank(stop, args.device)  # every process stops at this same step, or none does
        return stop

    def _metrics(self, logs: dict[str, Any]) -> dict[str, float | None]:
        """The sink's values for one Trainer log: the training ones with the speed since the last log, the
        eval loss."""
        values: dict[str, float | None] = {}
        if "loss" in logs:
            now, seen = time.perf_counter(), self.counter.total
            dt = now - self._mark[0]
            # The run's speed: this process's tokens times the processes (shards are near equal in size).
            values["tokens_per_s"] = (seen - self._mark[1]) * self.rank.world_size / dt if dt > 0 else None
            self._mark = (now, seen)
            values["loss"] = float(logs["loss"])
            values["learning_rate"] = finite(logs.get("learning_rate"))
            values["grad_norm"] = finite(logs.get("grad_norm"))
            values["memory_mb"] = peak_memory_mb(self.device)
        if "eval_loss" in logs:
            values["eval_loss"] = float(logs["eval_loss"])
        for key, name in PREFERENCE_LOGS.items():  # what a preference stage's TRL trainer logs
            if key in logs:
                values[name] = finite(logs[key])
        return values

    def _coach(self, state, control, model, evaluated: bool) -> None:
        if self._stop_if_diverged(control):
            return
        if evaluated and self.patience > 0 and self.early_stop is None:
            self._early_stopping(state, control, model)
        for advice in curve_advice(self.points, self.config):
            if advice.rule not in self._said:  # once per run: the curve is on screen, the event is the alert
                self._said.add(advice.rule)
                self.sink.event(advice.text(), EVENT_LEVEL[advice.severity])

    def _stop_if_diverged(self, control) -> bool:
        stop = divergence_stop(self.points) if self.stop_on_divergence else None
        if stop is None or self.diverged is not None:
            return False
        self.diverged = stop
        control.should_training_stop = True
        control.should_save = False  # never checkpoint a broken state
        control.should_evaluate = False
        self.sink.event(f"Stopping the run: {stop.text()}", EVENT_LEVEL[stop.severity])
        return True

    def _early_stopping(self, state, control, model) -> None:
        evals = [(p.step, p.eval_loss) for p in self.points if p.eval_loss is not None]
        finite_evals = [(step, loss) for step, loss in evals if math.isfinite(loss)]
        if not finite_evals:
            return
        best_step, best = min(finite_evals, key=lambda e: e[1])  # the first of equals, as early_stop_due counts
        if model is not None and best_step == evals[-1][0] and self._best_step() != best_step:
            self._best = (best_step, _trainable_copy(model))  # a new best: keep it to restore at the end
        if not early_stop_due([loss for _, loss in evals], self.patience):
            return
        self.early_stop = EarlyStop(state.global_step, best_step, best, self.patience)
        control.should_training_stop = True
        self.sink.event(
            f"Early stopping at step {state.global_step}: eval loss has not improved for {self.patience} "
            f"evaluations (best {best:.4g} at step {best_step})"
        )

    def _best_step(self) -> int | None:
        return self._best[0] if self._best is not None else None

    def restore_best(self) -> int | None:
        """Put the best evaluated weights back; their step, or None when they were not kept here (the
        best came before a resume)."""
        if self._best is None or self.early_stop is None or self._best_step() != self.early_stop.best_step:
            return None
        import torch

        with torch.no_grad():
            for param, saved in self._best[1]:
                param.copy_(saved.to(param.device, param.dtype))
        return self._best[0]


def _trainable_copy(model) -> list[tuple[Any, Any]]:
    """The trainable (LoRA) parameters with a CPU copy of each: small next to the model, and restorable in
    place, whatever wrapper the Trainer put around the model."""
    return [(p, p.detach().to("cpu", copy=True)) for p in model.parameters() if p.requires_grad]


def early_stop_summary(callback: StudioCallback, sink: MetricSink) -> dict[str, Any]:
    """After early stopping: put the best weights back when they were kept; what run.json records of it."""
    stop = callback.early_stop
    if stop is None:
        return {}
    restored = callback.restore_best()
    if restored is not None:
        sink.event(f"The adapter is the best state: step {restored}, eval loss {stop.best_eval_loss:.4g}")
    else:
        sink.event(
            f"The adapter is the last state (step {stop.step}): the best one (step {stop.best_step}) came before "
            "the resume, so it was not kept",
            "warning",
        )
    return {
        "early_stopping": {
            "stopped_at": stop.step,
            "best_step": stop.best_step,
            "best_eval_loss": stop.best_eval_loss,
            "adapter_is_best": restored is not None,
        }
    }
