"""The training coach: reads a run's curves and data, says in plain words what is wrong and what to change.

Every rule is a small pure function over metric points (anything with step, loss, eval_loss, grad_norm,
learning_rate: `studio.core.store.Metric`, or `Point` here), the run's `DataFacts` and its `RunConfig`, and
returns an `Advice` or None. `advise` runs them all; `divergence_stop` is what the auto-stop uses;
`early_stop_due` is the early-stopping test. Thresholds are named constants with the reason for each;
the troubleshooting table in FIELD-NOTES.md is where the wording of the fixes comes from.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.core.config import ConfigError, RunConfig
from studio.core.fsutil import atomic_write_json
from studio.core.problems import Severity
from studio.core.workspace import RunDir

SEVERITIES = (Severity.CRITICAL, Severity.WARNING, Severity.INFO)  # most severe first

# Divergence. A loss that turns NaN/inf never comes back. A loss above twice the starting loss (and at least
# 1 nat above it, so a run that starts near 0 is not stopped for noise) at 3 logs in a row is not a spike the
# run will recover from: healthy fine-tuning never climbs that far above where it started.
EXPLODE_FACTOR = 2.0
EXPLODE_MARGIN = 1.0
EXPLODE_LOGS = 3
# The starting loss: the median of the first 3 logs, leaving out those already past the explosion limit of the
# very first one (a run can blow up by its second log), so one odd batch neither raises nor lowers it much.
START_LOGS = 3

# Gradients: pre-clip norms 10x their early level at 3 logs in a row mean the updates are blowing up,
# even while clipping still holds the loss (early fp16 overflows are isolated, so 3 in a row is not them).
GRAD_FACTOR = 10.0
GRAD_LOGS = 3
GRAD_START_LOGS = 5

# Loss not falling: LoRA on new data typically takes 10-30% off the loss within the first tens of steps. Less
# than 5% between the first and the last quarter of the logs, after 30 steps, means it is not learning.
NOT_FALLING_MIN_STEPS = 30
NOT_FALLING_MIN_LOGS = 4
NOT_FALLING_DROP = 0.05
ALREADY_LOW_LOSS = 0.2  # below this the data is already fitted: nothing left to fall
LR_LOW = 5e-5  # the bottom of the QLoRA range (FIELD-NOTES: LoRA 1e-4..5e-4, QLoRA 5e-5..2e-4)
LR_HIGH = 1e-3  # twice the top of the LoRA range: updates overshoot and the loss bounces instead of falling

# Overfitting: eval loss rising at 2 evaluations in a row, ending at least 1% above its best (smaller moves
# are evaluation noise), while the train loss keeps falling.
OVERFIT_RISES = 2
OVERFIT_MARGIN = 0.01

# Preference runs. Pairs ranked right at 100% within the first third of the run, with an implicit-reward margin
# above 5 (odds of e^5 for the chosen answer), are being over-optimised: beta too low or pairs too easy, and
# the adapter drifts far from the reference for nothing more to learn.
EASY_ACCURACY = 0.99
EASY_MARGIN = 5.0
EASY_SHARE = 1 / 3
EASY_LOGS = 2
# Likelihood displacement: the chosen answers' log-probability falling by more than 10% (and 2 nats) between
# the first and last quarter of the logs, with the rejected ones falling too: the run pushes both down.
DISPLACED_DROP = 0.10
DISPLACED_NATS = 2.0
DISPLACED_MIN_LOGS = 4

# Data. 5% of answers without EOS is enough for a model to learn that answers sometimes go on; at half it
# mostly will not stop. 10% of samples cut is a real loss of signal (answers lose their ends); half is most.
EOS_WARN = 0.05
EOS_CRITICAL = 0.5
TRUNC_WARN = 0.10
TRUNC_CRITICAL = 0.5

# Rank 64+ is for complex reasoning on many thousands of examples; under 1,000 samples it mostly adds room to
# memorise them, plus parameters and memory that buy nothing.
HIGH_RANK = 64
TINY_DATA = 1000


@dataclass(frozen=True)
class Advice:
    rule: str
    severity: Severity  # CRITICAL, WARNING or INFO
    title: str
    detail: str  # plain words, with the figures that triggered it
    fix: str  # what to change, naming config fields (train.learning_rate, ...)
    step: int | None = None  # where it started, when the rule reads the curves

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def text(self) -> str:
        """One line for a log or an event."""
        where = f" (step {self.step})" if self.step is not None else ""
        return f"{self.title}{where}: {self.detail} Fix: {self.fix}"


@dataclass(frozen=True)
class DataFacts:
    """What the coach needs to know about a run's tokenized data, written to RUN_DIR/data_facts.json."""

    samples: int  # samples kept for training and evaluation
    truncated_share: float  # share of the kept samples longer than cutoff_len (their ends are cut)
    eos_missing_share: float  # share of the kept samples whose last trained token is not EOS
    dropped: int  # samples with no trained token left, skipped
    cutoff_len: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataFacts:
        return cls(
            samples=int(data["samples"]),
            truncated_share=float(data["truncated_share"]),
            eos_missing_share=float(data["eos_missing_share"]),
            dropped=int(data["dropped"]),
            cutoff_len=int(data["cutoff_len"]),
        )


@dataclass(frozen=True)
class Point:
    """One logged step, as the rules read it (studio.core.store.Metric has the same attributes)."""

    step: int
    loss: float | None = None
    eval_loss: float | None = None
    grad_norm: float | None = None
    learning_rate: float | None = None
    reward_margin: float | None = None  # preference stages
    reward_accuracy: float | None = None
    logps_chosen: float | None = None
    logps_rejected: float | None = None


_PREFERENCE_FIELDS = ("reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected")
_LOG_KEYS = {"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
             "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected"}  # fmt: skip


# -- building the inputs ------------------------------------------------------------------------------


def eos_missing_share(label_seqs: Sequence[Sequence[int]], eos_id: int | None, ignore_index: int = -100) -> float:
    """Share of samples whose last trained label is not EOS: answers the model never sees end. Samples with no
    trained label teach nothing and are left out; with no EOS token at all, no sample ends."""
    lasts = [next((x for x in reversed(seq) if x != ignore_index), None) for seq in label_seqs]
    trained = [x for x in lasts if x is not None]
    if not trained:
        return 0.0
    return sum(1 for x in trained if eos_id is None or x != eos_id) / len(trained)


def data_facts(
    label_seqs: Sequence[Sequence[int]], eos_id: int | None, truncated: int, dropped: int, cutoff_len: int
) -> DataFacts:
    """DataFacts from the kept samples' labels and the tokenizer's counts."""
    n = len(label_seqs)
    return DataFacts(
        samples=n,
        truncated_share=truncated / n if n else 0.0,
        eos_missing_share=eos_missing_share(label_seqs, eos_id),
        dropped=dropped,
        cutoff_len=cutoff_len,
    )


def points_from_log_history(history: Iterable[Mapping[str, Any]]) -> list[Point]:
    """transformers' `state.log_history` (train and eval entries, raw floats, NaN kept) as one Point per step."""
    by_step: dict[int, Point] = {}
    for entry in history:
        if "step" not in entry or ("loss" not in entry and "eval_loss" not in entry):
            continue  # the end-of-training summary and the like
        step = int(entry["step"])
        point = by_step.get(step, Point(step))
        updates = {k: _float(entry[k]) for k in ("loss", "eval_loss", "grad_norm", "learning_rate") if k in entry}
        updates.update({name: _float(entry[key]) for key, name in _LOG_KEYS.items() if key in entry})
        by_step[step] = dataclasses.replace(point, **updates)
    return [by_step[s] for s in sorted(by_step)]


_TRAIN_ONLY = ("learning_rate", "tokens_per_s", "memory_mb")  # columns only a train log fills


def points_from_metrics(metrics: Iterable[Any]) -> list[Point]:
    """Store rows as Points. SQLite keeps NaN as NULL, and every train row the worker writes carries a loss,
    so a train row (it has a learning rate, speed or memory) without one had a NaN loss: it is put back."""
    out = []
    for m in metrics:
        loss = m.loss
        if loss is None and any(getattr(m, k, None) is not None for k in _TRAIN_ONLY):
            loss = math.nan
        preference = {k: getattr(m, k, None) for k in _PREFERENCE_FIELDS}
        out.append(Point(m.step, loss, m.eval_loss, m.grad_norm, m.learning_rate, **preference))
    return out


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _train(points: Sequence[Any]) -> list[Any]:
    """Points with a train loss (NaN and inf included)."""
    return [p for p in points if p.loss is not None]


def _explode_limit(start: float) -> float:
    return max(EXPLODE_FACTOR * start, start + EXPLODE_MARGIN)


def _start_loss(train: Sequence[Any]) -> float | None:
    first = [p.loss for p in train[:START_LOGS] if _finite(p.loss)]
    if not first:
        return None
    return statistics.median([x for x in first if x <= _explode_limit(first[0])])


# -- rules over the curves ------------------------------------------------------------------------------

_DIVERGE_FIX = (
    "Lower train.learning_rate (e.g. to a third; LoRA 1e-4 to 5e-4) or lora.alpha (alpha = r is conservative), "
    "keep gradient clipping on (train.max_grad_norm 0.3-1.0) and warm up (train.warmup_ratio 0.03-0.1)"
)


def diverged(points: Sequence[Any]) -> Advice | None:
    """The train loss turned NaN or infinite: the weights are broken and training cannot recover."""
    bad = next((p for p in _train(points) if not math.isfinite(p.loss)), None)
    if bad is None:
        return None
    what = "NaN" if math.isnan(bad.loss) else "infinite"
    return Advice(
        rule="diverged",
        severity=Severity.CRITICAL,
        title="Training diverged",
        detail=f"the loss became {what} at step {bad.step}; the weights are broken from there on.",
        fix=_DIVERGE_FIX + "; with train.compute_type fp16, try bf16 or fp32.",
        step=bad.step,
    )


def exploding(points: Sequence[Any]) -> Advice | None:
    """The loss climbed far above where it started and stayed there for several logs."""
    train = _train(points)
    start = _start_loss(train)
    if start is None or len(train) < START_LOGS + EXPLODE_LOGS:
        return None
    limit = _explode_limit(start)
    recent = train[-EXPLODE_LOGS:]
    if not all(_finite(p.loss) and p.loss > limit for p in recent):
        return None
    figures = ", ".join(f"{p.loss:.3g}" for p in recent)
    began = recent[0]
    for p in reversed(train[:-EXPLODE_LOGS]):  # where the climb began: the first of the logs past the limit
        if not (_finite(p.loss) and p.loss > limit):
            break
        began = p
    return Advice(
        rule="exploding",
        severity=Severity.CRITICAL,
        title="The loss is exploding",
        detail=(
            f"the loss started at {start:.3g} and has been above {limit:.3g} for the last {EXPLODE_LOGS} logs "
            f"({figures}): the updates are too large and are undoing what the model knew."
        ),
        fix=_DIVERGE_FIX + ".",
        step=began.step,
    )


def divergence_stop(points: Sequence[Any]) -> Advice | None:
    """The reason to stop a run now (NaN/inf loss, or an exploding loss), or None."""
    return diverged(points) or exploding(points)


def gradients_exploding(points: Sequence[Any], config: RunConfig | None = None) -> Advice | None:
    """Pre-clip gradient norms far above their early level at several logs in a row (or NaN/inf)."""
    norms = [p for p in points if p.grad_norm is not None]
    early = [p.grad_norm for p in norms[:GRAD_START_LOGS] if _finite(p.grad_norm)]
    if not early or len(norms) < GRAD_START_LOGS + GRAD_LOGS:
        return None
    base = statistics.median(early)
    recent = norms[-GRAD_LOGS:]
    if base <= 0 or not all(not _finite(p.grad_norm) or p.grad_norm >= GRAD_FACTOR * base for p in recent):
        return None
    clipping = config is not None and config.train.max_grad_norm > 0
    fix = "Lower train.learning_rate and warm up (train.warmup_ratio 0.03-0.1)"
    fix += (
        "; clipping (train.max_grad_norm) is holding the steps for now."
        if clipping
        else "; turn gradient clipping on: train.max_grad_norm 0.3-1.0."
    )
    return Advice(
        rule="gradients_exploding",
        severity=Severity.WARNING,
        title="Gradients are blowing up",
        detail=(
            f"the gradient norm was about {base:.3g} early on and is "
            f"{', '.join(f'{p.grad_norm:.3g}' for p in recent)} at the last {GRAD_LOGS} logs "
            f"({GRAD_FACTOR:g}x or more): training is unstable and may diverge."
        ),
        fix=fix,
        step=recent[0].step,
    )


def loss_not_falling(
    points: Sequence[Any], config: RunConfig | None = None, min_steps: int = NOT_FALLING_MIN_STEPS
) -> Advice | None:
    """After min_steps, the last quarter of the logged losses is less than 5% below the first quarter."""
    train = [p for p in _train(points) if _finite(p.loss)]
    if len(train) < NOT_FALLING_MIN_LOGS or train[-1].step < min_steps:
        return None
    w = max(2, len(train) // 4)
    first = statistics.fmean(p.loss for p in train[:w])
    last = statistics.fmean(p.loss for p in train[-w:])
    if last < ALREADY_LOW_LOSS or first <= 0 or (first - last) / first >= NOT_FALLING_DROP:
        return None
    detail = (
        f"after {train[-1].step} steps the loss is {last:.3g} on average, against {first:.3g} at the start "
        f"({100 * (first - last) / first:+.1f}%; a learning run takes 10-30% off early)"
    )
    lr = config.train.learning_rate if config is not None else None
    if lr is not None and lr < LR_LOW:
        detail += f". The learning rate {lr:g} is below the usual range (LoRA 1e-4 to 5e-4), so steps are tiny."
        fix = "Raise train.learning_rate (2e-4 is a good start; QLoRA 1e-4)."
    elif lr is not None and lr > LR_HIGH:
        detail += f". The learning rate {lr:g} is above the usual range, so updates overshoot and the loss bounces."
        fix = "Lower train.learning_rate to 1e-4 to 5e-4 (2e-4 is a good start)."
    else:
        detail += (
            ". The learning rate is in the usual range, so the data or the adapter is the suspect: a prompt "
            "format the base model does not know, too few adapted layers, or too few trained tokens."
        )
        fix = (
            "Use the base model's own chat template (not a foreign one); set lora.target_modules to all-linear "
            "and raise lora.r; check in the dataset preview that the answers are what is trained "
            "(data.train_on_prompt off, answers not cut off by data.cutoff_len)."
        )
    return Advice(
        "loss_not_falling", Severity.WARNING, "The loss is not falling", detail + ".", fix, step=train[-1].step
    )


def overfitting(points: Sequence[Any], finished: bool = False) -> Advice | None:
    """Eval loss rising for 2+ evaluations in a row, past its best, while the train loss falls."""
    evals = [p for p in points if _finite(p.eval_loss)]
    if len(evals) < OVERFIT_RISES + 1:
        return None
    tail = evals[-(OVERFIT_RISES + 1) :]
    if not all(b.eval_loss > a.eval_loss for a, b in itertools.pairwise(tail)):
        return None
    best = min(evals, key=lambda p: p.eval_loss)
    if tail[-1].eval_loss < best.eval_loss * (1 + OVERFIT_MARGIN):
        return None
    before, now = _train_loss_near(points, tail[0].step), _train_loss_near(points, tail[-1].step)
    if before is None or now is None or not now < before:
        return None
    fix = (
        "Turn on early stopping (train.early_stopping_patience, e.g. 3), or train fewer train.epochs; raise "
        "lora.dropout (0.1), lower lora.r, or add data."
    )
    if finished:
        fix = f"Use the checkpoint nearest step {best.step} if one was kept, and next time: " + fix[0].lower() + fix[1:]
    return Advice(
        rule="overfitting",
        severity=Severity.WARNING,
        title="Overfitting",
        detail=(
            f"the eval loss rose at the last {OVERFIT_RISES} evaluations to {tail[-1].eval_loss:.3g} (best "
            f"{best.eval_loss:.3g} at step {best.step}) while the train loss fell from {before:.3g} to "
            f"{now:.3g}: the adapter is memorising the training samples instead of learning the task."
        ),
        fix=fix,
        step=tail[1].step,
    )


def _train_loss_near(points: Sequence[Any], step: int, span: int = 3) -> float | None:
    """Mean of up to `span` finite train losses logged at or before `step` (single batches are noisy)."""
    losses = [p.loss for p in points if p.step <= step and _finite(p.loss)][-span:]
    return statistics.fmean(losses) if losses else None


def early_stop_due(eval_losses: Sequence[float], patience: int, min_delta: float = 0.0) -> bool:
    """True once `patience` evaluations in a row have not improved on the best by more than min_delta."""
    if patience <= 0:
        return False
    best, since = math.inf, 0
    for loss in eval_losses:
        if loss < best - min_delta:  # NaN never improves
            best, since = loss, 0
        else:
            since += 1
    return since >= patience


# -- rules over the data ----------------------------------------------------------------------------------


def never_ends(facts: DataFacts | None) -> Advice | None:
    """Training answers without EOS: the model never learns to stop."""
    if facts is None or facts.eos_missing_share < EOS_WARN:
        return None
    share = facts.eos_missing_share
    by_cutoff = _eos_lost_to_cutoff(facts)
    cause = (
        f"they are cut off by data.cutoff_len={facts.cutoff_len} before their end"
        if by_cutoff
        else "their targets do not end with the tokenizer's EOS token"
    )
    return Advice(
        rule="never_ends",
        severity=Severity.CRITICAL if share >= EOS_CRITICAL else Severity.WARNING,
        title="Answers that never end",
        detail=(
            f"{100 * share:.0f}% of the training answers ({round(share * facts.samples)} of {facts.samples}) have "
            f"no end-of-sequence token: {cause}. The model learns that answers go on, and repeats itself."
        ),
        fix=(
            "Raise data.cutoff_len so answers keep their end (see the token lengths in the dataset view)"
            if by_cutoff
            else "Append EOS to every answer: use the base model's chat template, whose assistant turn ends with EOS"
        )
        + ".",
    )


def _eos_lost_to_cutoff(facts: DataFacts) -> bool:
    # build_sample appends EOS to every answer, so an answer loses it when data.cutoff_len cuts its end.
    return facts.truncated_share >= 0.9 * facts.eos_missing_share


def heavy_truncation(facts: DataFacts | None) -> Advice | None:
    """Many samples longer than cutoff_len (or dropped with no answer token left)."""
    if facts is None:
        return None
    total = facts.samples + facts.dropped
    cut = round(facts.truncated_share * facts.samples) + facts.dropped
    share = cut / total if total else 0.0
    if share < TRUNC_WARN:
        return None
    detail = (
        f"{100 * share:.0f}% of the samples ({cut} of {total}) are longer than data.cutoff_len="
        f"{facts.cutoff_len} tokens and lose their ends"
    )
    if facts.dropped:
        detail += f"; {facts.dropped} had no answer token left and are skipped"
    return Advice(
        rule="heavy_truncation",
        severity=Severity.CRITICAL if share >= TRUNC_CRITICAL else Severity.WARNING,
        title="Heavy truncation",
        detail=detail + ". Cut answers teach half-answers and lose their EOS, so the model learns not to stop.",
        fix=(
            "Raise data.cutoff_len to cover most samples (the dataset view shows the p95 length), or filter "
            "out the longest samples; turn on gradient checkpointing if memory is the limit."
        ),
    )


def tiny_data_high_rank(facts: DataFacts | None, config: RunConfig | None) -> Advice | None:
    """A high rank on a few hundred samples: room to memorise, and parameters that buy nothing."""
    if facts is None or config is None or facts.samples >= TINY_DATA or config.lora.r < HIGH_RANK:
        return None
    r = config.lora.r
    return Advice(
        rule="tiny_data_high_rank",
        severity=Severity.WARNING,
        title="High rank for a small dataset",
        detail=(
            f"lora.r={r} on {facts.samples} samples. Ranks of 64 and more are for complex tasks with many "
            "thousands of examples; here the extra capacity mostly lets the adapter memorise the samples "
            "(overfitting), and costs parameters, memory and time that buy nothing."
        ),
        fix=f"Use lora.r 8-16 (lora.alpha = 2*r), raise lora.dropout to 0.1, or add data. (Now r={r}.)",
    )


# -- all together -------------------------------------------------------------------------------------------


def data_advice(facts: DataFacts | None, config: RunConfig | None) -> list[Advice]:
    """The rules that need only the data: known before the first step. Answers without EOS because of the
    cutoff are said once, under heavy truncation, when that fires too."""
    truncation = heavy_truncation(facts)
    eos = never_ends(facts)
    if eos is not None and truncation is not None and facts is not None and _eos_lost_to_cutoff(facts):
        if eos.severity == Severity.CRITICAL:
            truncation = dataclasses.replace(truncation, severity=Severity.CRITICAL)
        eos = None
    found = [eos, truncation, tiny_data_high_rank(facts, config)]
    return _by_severity([a for a in found if a is not None])


def pairs_too_easy(points: Sequence[Any], config: RunConfig | None = None) -> Advice | None:
    """A preference run ranking every pair right, by a wide margin, in its first third: over-optimising."""
    ranked = [p for p in points if getattr(p, "reward_accuracy", None) is not None]
    total = config.train.max_steps if config is not None and config.train.max_steps > 0 else None
    horizon = (total or (ranked[-1].step if ranked else 0)) * EASY_SHARE
    early = [p for p in ranked if p.step <= horizon]
    for i in range(len(early) - EASY_LOGS + 1):
        window = early[i : i + EASY_LOGS]
        margin = window[-1].reward_margin
        wide = all(p.reward_margin is not None and p.reward_margin > EASY_MARGIN for p in window)
        if wide and all(p.reward_accuracy >= EASY_ACCURACY for p in window):
            beta = config.preference.beta if config is not None else None
            return Advice(
                "pairs_too_easy",
                Severity.WARNING,
                "Every pair is ranked right already, by a wide margin",
                f"accuracy {window[-1].reward_accuracy:.0%} with a reward margin of {margin:.1f} at step "
                f"{window[-1].step}, in the first third of the run"
                + (f" (beta {beta:g})" if beta is not None else "")
                + ": the adapter keeps moving away from the reference with nothing left to learn from these pairs.",
                "Raise preference.beta (0.1 -> 0.3-0.5) to hold the adapter nearer the reference, stop earlier "
                "(fewer train.max_steps), or use harder pairs (rejected answers close to the chosen ones).",
                step=window[0].step,
            )
    return None


def chosen_displaced(points: Sequence[Any], config: RunConfig | None = None) -> Advice | None:
    """The chosen answers' log-probability falling with the rejected ones': DPO pushing both down."""
    logged = [p for p in points if _finite(getattr(p, "logps_chosen", None))]
    logged = [p for p in logged if _finite(p.logps_rejected)]
    if len(logged) < DISPLACED_MIN_LOGS:
        return None
    w = max(1, len(logged) // 4)
    chosen_start = statistics.fmean(p.logps_chosen for p in logged[:w])
    chosen_end = statistics.fmean(p.logps_chosen for p in logged[-w:])
    rejected_start = statistics.fmean(p.logps_rejected for p in logged[:w])
    rejected_end = statistics.fmean(p.logps_rejected for p in logged[-w:])
    drop = chosen_start - chosen_end
    if drop < DISPLACED_NATS or drop < DISPLACED_DROP * abs(chosen_start) or rejected_end >= rejected_start:
        return None
    return Advice(
        "chosen_displaced",
        Severity.WARNING,
        "The chosen answers are getting less likely too",
        f"the log-probability of the chosen answers fell from {chosen_start:.1f} to {chosen_end:.1f} while the "
        f"rejected ones fell from {rejected_start:.1f} to {rejected_end:.1f}: the margin grows by pushing both "
        "down, a known DPO failure that makes the answers worse even as the accuracy rises",
        "Lower train.learning_rate, raise preference.beta, or train an SFT stage on the chosen answers first and "
        "start from it (preference.start_from); stage orpo keeps an SFT term on the chosen answers.",
        step=logged[-1].step,
    )


def curve_advice(points: Sequence[Any], config: RunConfig | None, finished: bool = False) -> list[Advice]:
    """The rules over the curves. A diverged run gets only that: the rest would be its consequences. A
    preference run's loss starts near 0.69 and reads differently: its own rules replace loss_not_falling."""
    stop = divergence_stop(points)
    if stop is not None:
        return [stop]
    if config is not None and config.stage != "sft":
        found = [gradients_exploding(points, config), pairs_too_easy(points, config), chosen_displaced(points, config)]
    else:
        found = [gradients_exploding(points, config), loss_not_falling(points, config)]
    found.append(overfitting(points, finished))
    return _by_severity([a for a in found if a is not None])


def advise(
    points: Sequence[Any], facts: DataFacts | None, config: RunConfig | None, finished: bool = False
) -> list[Advice]:
    """Every rule, most severe first."""
    return _by_severity([*curve_advice(points, config, finished), *data_advice(facts, config)])


def _by_severity(advice: list[Advice]) -> list[Advice]:
    return sorted(advice, key=lambda a: SEVERITIES.index(a.severity) if a.severity in SEVERITIES else len(SEVERITIES))


def read_data_facts(run_dir: Path) -> DataFacts | None:
    """RUN_DIR/data_facts.json, or None when the run has not got that far (or wrote something unreadable)."""
    try:
        return DataFacts.from_dict(json.loads(RunDir(run_dir).data_facts.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_data_facts(run_dir: Path, facts: DataFacts) -> None:
    atomic_write_json(RunDir(run_dir).data_facts, facts.to_dict())  # the UI's timer never reads half


def advice_for_run(store: Any, run: Any) -> list[Advice]:
    """The coach on one run of the store, while it trains or after."""
    try:
        config = RunConfig.from_dict(run.config)
    except ConfigError:
        config = None  # a config from another version: the rules that need it stay quiet
    points = points_from_metrics(store.metrics(run.id))
    return advise(points, read_data_facts(Path(run.run_dir)), config, finished=run.status.finished)
