"""Sweeps: one short scan run per value of one or two parameters, compared, with a recommended pick.

Practitioners scan ranks [8, 16, 32, 64] on a few hundred steps, look for the knee, then train the best
longer (FIELD-NOTES.md). A sweep is the base config the user filled in (its own epochs/max_steps are the
LONG run), the swept parameters, and `scan_steps`, the train.max_steps of every scan run. The functions
here are pure; the store keeps sweeps, `JobManager.submit_sweep` queues them, the CLI and the UI show them.

CLI (wired into `studio` by cli.py through `add_arguments` and `run_cli`):
    studio sweep start CONFIG_OR_PRESET --param lora.r=8,16,32,64 [--param train.learning_rate=1e-4,2e-4]
                       [--scan-steps N] [--set KEY=VALUE ...] [--name NAME] [--detach]
    studio sweep show SWEEP_ID [--json]
    studio sweep promote SWEEP_ID [--detach]
    studio sweep list [--json]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from studio.core.config import ConfigError, RunConfig
from studio.core.problems import Problem
from studio.core.store import Metric, Run, RunStatus

# What a sweep may vary: "section.field" of RunConfig -> the type its values are read as.
SWEEPABLE: dict[str, type] = {
    "lora.r": int,
    "lora.alpha": float,
    "lora.dropout": float,
    "lora.target_modules": str,
    "lora.use_rslora": bool,
    "lora.use_dora": bool,
    "train.learning_rate": float,
    "train.batch_size": int,
    "train.grad_accum": int,
    "train.warmup_ratio": float,
    "train.weight_decay": float,
    "train.lr_scheduler": str,
    "data.cutoff_len": int,
}

# Fields one might try to sweep but whose scan runs would not compare; the reason is the error message.
NOT_SWEEPABLE: dict[str, str] = {
    "train.epochs": "scan runs stop at scan_steps, so every value would train the same; "
    "the long run keeps the base config's epochs",
    "train.max_steps": "every scan run trains scan_steps steps; set the long run's length in the base config",
    "data.val_size": "each value would hold out a different eval split, so the eval losses would not compare",
    "train.seed": "the seed also picks the eval split, so the eval losses would not compare",
}

# Short names for run names: "<name>-r8-a16-lr0.0002".
SHORT: dict[str, str] = {
    "lora.r": "r",
    "lora.alpha": "a",
    "lora.dropout": "drop",
    "lora.target_modules": "tm",
    "lora.use_rslora": "rslora",
    "lora.use_dora": "dora",
    "train.learning_rate": "lr",
    "train.batch_size": "bs",
    "train.grad_accum": "ga",
    "train.warmup_ratio": "wu",
    "train.weight_decay": "wd",
    "train.lr_scheduler": "sched",
    "data.cutoff_len": "len",
}

# Parameters that change a run's cost; the first one swept is the grid's outer loop, smallest value first,
# so the cheap runs finish first and the knee shows early.
COST_ORDER = ("lora.r", "data.cutoff_len", "lora.target_modules", "train.batch_size", "train.grad_accum")
TARGET_COST = {"q,v": 0, "attention": 1, "all-linear": 2}

MAX_PARAMS = 2
MAX_RUNS = 16
DEFAULT_SCAN_STEPS = 200
# Final eval losses within 1% (relative) of the best tie: a short scan's loss moves about that much with
# the seed alone. Relative, not absolute nats, so it means the same at loss 0.3 and at loss 3.
TIE_TOLERANCE = 0.01


class SweepError(ConfigError):
    """A sweep that cannot be queued; `problems` lists every reason. A ConfigError (so a ValueError):
    the CLI and the UI report it as they report a bad run config."""

    def __init__(self, problems: list[Problem] | list[str] | list[Problem | str]):
        super().__init__(problems)
        self.args = ("Invalid sweep:\n- " + "\n- ".join(map(str, self.problems)),)


@dataclass(frozen=True)
class SweepParam:
    path: str  # "section.field" of RunConfig, a key of SWEEPABLE
    values: tuple  # coerced to the field's type, no duplicates, at least two

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "values": list(self.values)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepParam:
        return cls(str(data["path"]), tuple(data["values"]))


@dataclass
class SweepRow:
    """One scan run in the sweep's table."""

    run_id: str
    name: str
    values: dict[str, Any]  # the swept values of this run, by path
    status: str
    final_train_loss: float | None
    final_eval_loss: float | None
    trainable_params: int | None
    seconds: float | None
    peak_memory_mb: float | None


@dataclass(frozen=True)
class Pick:
    """The recommended scan run, and why, in a plain sentence with the figures."""

    run_id: str
    values: dict
    reason: str
    metric: str = "eval_loss"  # what the pick was made on: "eval_loss", or "loss" (train) as a fallback
    loss: float | None = None


# -- parsing --------------------------------------------------------------------------------------------
def _sweepable_list() -> str:
    return ", ".join(SWEEPABLE)


def _coerce_value(text: str, kind: type) -> Any:
    """One value of a --param, as the field's type; ValueError says what is wrong with it."""
    if kind is bool:
        low = text.lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"'{text}' is not true or false")
    if kind is int:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"'{text}' is not a whole number") from None
        if not number.is_integer():
            raise ValueError(f"'{text}' is not a whole number")
        return int(number)
    if kind is float:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"'{text}' is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"'{text}' is not a finite number")
        return number
    return text


def parse_param(text: str) -> SweepParam:
    """`lora.r=8,16,32,64` -> SweepParam("lora.r", (8, 16, 32, 64)). Values that hold commas themselves
    (target_modules 'q,v') are separated by '|' instead: `lora.target_modules=q,v|attention|all-linear`."""
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or not path:
        raise SweepError([Problem(path, f"'{text}' is not PATH=V1,V2,...", "write e.g. lora.r=8,16,32,64.")])
    if path in NOT_SWEEPABLE:
        raise SweepError(
            [Problem(path, f"{path} cannot be swept: {NOT_SWEEPABLE[path]}. Sweepable: {_sweepable_list()}.")]
        )
    if path not in SWEEPABLE:
        raise SweepError([Problem(path, f"'{path}' is not a sweepable parameter. Sweepable: {_sweepable_list()}.")])
    splitter = "|" if "|" in raw else ","
    parts = [p.strip() for p in raw.split(splitter)]
    if path == "lora.target_modules" and splitter == "," and "q" in parts and "v" in parts:
        raise SweepError(
            [
                Problem(
                    path,
                    "lora.target_modules: the group 'q,v' holds a comma, so separate the values with '|', "
                    "e.g. lora.target_modules='q,v|attention|all-linear'.",
                )
            ]
        )
    if any(not p for p in parts):
        raise SweepError([Problem(path, f"{path}: an empty value in '{raw}'; write e.g. {path}={_example(path)}.")])
    values, problems = [], []
    for part in parts:
        try:
            values.append(_coerce_value(part, SWEEPABLE[path]))
        except ValueError as err:
            problems.append(Problem(path, f"{path}: {err}; write e.g. {path}={_example(path)}."))
    if problems:
        raise SweepError(problems)
    dupes = sorted({_fmt(v) for i, v in enumerate(values) if v in values[:i]})
    if dupes:
        raise SweepError([Problem(path, f"{path}: {', '.join(dupes)} given twice; give each value once.")])
    if len(values) < 2:
        raise SweepError(
            [Problem(path, f"{path} needs at least 2 values to compare (got '{raw}'); e.g. {path}={_example(path)}.")]
        )
    return SweepParam(path, tuple(values))


def _example(path: str) -> str:
    kind = SWEEPABLE.get(path, int)
    if path == "lora.r":
        return "8,16,32,64"
    if path == "train.learning_rate":
        return "1e-4,2e-4,5e-4"
    if path == "lora.target_modules":
        return "'q,v|attention|all-linear'"
    if path == "train.lr_scheduler":
        return "cosine,constant"
    if kind is bool:
        return "false,true"
    if kind is float:
        return "0.0,0.05,0.1"
    return "256,512"


# -- the grid ---------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_values(values: dict[str, Any]) -> str:
    """{"lora.r": 8, "train.learning_rate": 0.0002} -> "lora.r=8, train.learning_rate=0.0002"."""
    return ", ".join(f"{path}={_fmt(v)}" for path, v in values.items())


def alpha_follows_rank(values: dict[str, Any], config: RunConfig) -> bool:
    """Whether this run's alpha is scaled with its rank: r is swept, alpha is not, and rsLoRA is off
    (rsLoRA scales by alpha/sqrt(r), already stable across ranks, so alpha stays fixed there)."""
    return "lora.r" in values and "lora.alpha" not in values and not config.lora.use_rslora


def scaled_alpha(base_alpha: float, base_r: int, r: int) -> float:
    """alpha at rank r keeping the base's alpha/r ratio (practitioners' 2*r stays 2*r), rounded."""
    return round(base_alpha / base_r * r, 4)


def _valid_ratio(base: RunConfig) -> bool:
    r, alpha = base.lora.r, base.lora.alpha
    return isinstance(r, int) and not isinstance(r, bool) and r >= 1 and isinstance(alpha, (int, float)) and alpha > 0


def apply_values(base: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A copy of `base` with the swept values set, and alpha scaled with r where the rule applies."""
    config = RunConfig.from_dict(base.to_dict())
    for path, value in values.items():
        section, name = path.split(".", 1)
        setattr(getattr(config, section), name, value)
    if alpha_follows_rank(values, config) and _valid_ratio(base) and _is_count(config.lora.r):
        config.lora.alpha = scaled_alpha(base.lora.alpha, base.lora.r, config.lora.r)
    return config


def run_suffix(values: dict[str, Any], config: RunConfig) -> str:
    """The run-name suffix, e.g. r8-a16-lr0.0002: the swept values, and the derived alpha where it follows r."""
    parts = []
    for path, value in values.items():
        if isinstance(value, bool):
            parts.append(SHORT[path] if value else f"no-{SHORT[path]}")
        else:
            parts.append(f"{SHORT.get(path, path.split('.')[-1])}{_fmt(value).replace(',', '+')}")
        if path == "lora.r" and alpha_follows_rank(values, config):
            parts.append(f"a{_fmt(config.lora.alpha)}")
    return "-".join(parts)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def as_steps(value: Any) -> Any:
    """A form's number widget gives 200.0: take a whole float as an int; anything else is left for
    validation to refuse with a message."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def scan_config(base: RunConfig, values: dict[str, Any], scan_steps: int, name: str) -> RunConfig:
    """One scan run: the base with the values, stopped at scan_steps."""
    config = apply_values(base, values)
    config.name = name
    config.train.max_steps = scan_steps
    # A few eval points (and ~10 train-loss points) per scan run, so the overlaid curves have a shape.
    # Only ever lowered from what the user chose; the trainer also evaluates at the last step.
    if _is_count(config.train.eval_steps) and _is_count(scan_steps):
        config.train.eval_steps = min(config.train.eval_steps, max(1, scan_steps // 4))
    if _is_count(config.train.logging_steps) and _is_count(scan_steps):
        config.train.logging_steps = min(config.train.logging_steps, max(1, scan_steps // 10))
    return config


def long_run_config(base: RunConfig, values: dict[str, Any], name: str) -> RunConfig:
    """The long run from a pick: the base config with its own epochs/max_steps, the pick's values, and
    alpha scaled with r by the same rule as the scan."""
    config = apply_values(base, values)
    config.name = name
    return config


def _ordered_values(param: SweepParam) -> list:
    if param.path == "lora.target_modules":
        return sorted(param.values, key=_target_cost)
    if all(isinstance(v, (int, float)) for v in param.values):  # bools too: off (cheaper) first
        return sorted(param.values)
    return list(param.values)


def _target_cost(value: Any) -> int:
    """Fewer adapted layers first: q,v < attention < all-linear; a list of names by its length."""
    if isinstance(value, str):
        return TARGET_COST.get(value.strip(), len(value.split(",")))
    return len(value) if isinstance(value, (list, tuple)) else 0


def _grid_problems(params: Sequence[SweepParam], scan_steps: Any) -> list[Problem]:
    p: list[Problem] = []
    if not params:
        p.append(Problem("", "Name at least one parameter to sweep, e.g. lora.r=8,16,32,64."))
    if len(params) > MAX_PARAMS:
        p.append(
            Problem(
                "",
                f"At most {MAX_PARAMS} parameters per sweep (got {len(params)}: {', '.join(x.path for x in params)})",
                "sweep the rank first, then the learning rate at the best rank.",
            )
        )
    paths = [x.path for x in params]
    for path in sorted({x for x in paths if paths.count(x) > 1}):
        p.append(Problem(path, f"{path} is given twice", "give all its values in one parameter."))
    for x in params:
        if x.path not in SWEEPABLE:
            p.append(Problem(x.path, f"'{x.path}' is not a sweepable parameter. Sweepable: {_sweepable_list()}."))
        elif len(x.values) < 2:
            p.append(Problem(x.path, f"{x.path} needs at least 2 values to compare."))
    size = math.prod(len(x.values) for x in params) if params else 0
    if size > MAX_RUNS:
        counts = " x ".join(str(len(x.values)) for x in params)
        p.append(Problem("", f"The grid has {counts} = {size} runs, more than {MAX_RUNS}", "drop some values."))
    if not _is_count(scan_steps):
        p.append(
            Problem(
                "scan_steps",
                f"scan_steps must be a whole number of at least 1 (got {scan_steps!r}); 100-300 steps show the knee.",
            )
        )
    return p


def expand(
    base: RunConfig, params: Sequence[SweepParam], scan_steps: int, name: str
) -> list[tuple[dict[str, Any], RunConfig]]:
    """The scan runs: (swept values, config) per grid point, cheapest first. Every config is validated and
    every problem reported in one SweepError, so an invalid value queues nothing."""
    scan_steps = as_steps(scan_steps)
    problems = _grid_problems(params, scan_steps)
    if problems:
        raise SweepError(problems)
    prefix = name or base.name or "sweep"
    ordered = sorted(params, key=lambda x: COST_ORDER.index(x.path) if x.path in COST_ORDER else len(COST_ORDER))
    paths = [x.path for x in ordered]
    plan: list[tuple[dict[str, Any], RunConfig]] = []
    where: dict[Problem, list[str]] = {}  # problem -> the runs that have it
    for combo in itertools.product(*(_ordered_values(x) for x in ordered)):
        values = dict(zip(paths, combo, strict=True))
        config = scan_config(base, values, scan_steps, "")
        config.name = f"{prefix}-{run_suffix(values, config)}"
        plan.append((values, config))
        for problem in config.validate():
            where.setdefault(problem, []).append(format_values(values))
    for problem in long_run_config(base, plan[0][0], prefix).validate():
        if problem not in where:
            where[problem] = ["the long run, which keeps the base config's epochs/max_steps"]
    for problem, runs in where.items():
        if len(runs) < len(plan):
            problem = Problem(problem.path, f"{problem} (in {'; '.join(runs)})")
        problems.append(problem)
    if problems:
        raise SweepError(problems)
    return plan


def long_run_length(config: RunConfig) -> str:
    t = config.train
    return f"max_steps {t.max_steps}" if _is_count(t.max_steps) else f"{_fmt(t.epochs)} epochs"


def sweep_notes(base: RunConfig, params: Sequence[SweepParam], scan_steps: int) -> list[str]:
    """What the user should know about how the scan runs differ from the base config, in sentences."""
    notes: list[str] = []
    paths = {x.path for x in params}
    if "lora.r" in paths and "lora.alpha" not in paths and _valid_ratio(base):
        if base.lora.use_rslora and "lora.use_rslora" not in paths:
            notes.append(
                f"lora.alpha stays {_fmt(base.lora.alpha)} at every rank: rsLoRA scales by alpha/sqrt(r), "
                "which is already stable across ranks."
            )
        else:
            ratio = base.lora.alpha / base.lora.r
            rslora = " (not in the rsLoRA runs: rsLoRA's alpha/sqrt(r) is stable as it is)"
            notes.append(
                f"lora.alpha follows lora.r at the base config's ratio alpha/r = {_fmt(base.lora.alpha)}/"
                f"{base.lora.r} = {ratio:g}{rslora if 'lora.use_rslora' in paths else ''}: practitioners scale "
                "alpha with r, so each rank keeps the same update scale. The run names show it (r8-a16)."
            )
    if _is_count(scan_steps) and _is_count(base.train.max_steps) and scan_steps >= base.train.max_steps:
        notes.append(
            f"Scan runs train {scan_steps} steps, not fewer than the long run ({base.train.max_steps}): "
            "lower scan_steps to make the scan cheap."
        )
    if not base.data.val_size:
        notes.append(
            "data.val_size is 0: no eval loss, so the pick falls back to train loss, which favours bigger "
            "ranks. Set data.val_size (e.g. 0.1) for a pick made on held-out data."
        )
    if _is_count(scan_steps):
        probe = scan_config(base, {}, scan_steps, "")
        if probe.train.eval_steps != base.train.eval_steps and base.data.val_size:
            notes.append(
                f"Scan runs evaluate every {probe.train.eval_steps} steps (base: {base.train.eval_steps}), "
                "so each eval curve has a few points."
            )
    if "data.cutoff_len" in paths:
        notes.append("Each cutoff_len cuts the eval samples differently, so compare their eval losses with care.")
    return notes


# -- results ----------------------------------------------------------------------------------------------
def values_of(config: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """The values at `paths` in a run's config dict."""
    out = {}
    for path in paths:
        section, name = path.split(".", 1)
        out[path] = (config.get(section) or {}).get(name)
    return out


def _last(metrics: Sequence[Metric], field: str) -> float | None:
    return next((getattr(m, field) for m in reversed(metrics) if getattr(m, field) is not None), None)


def _number(data: dict | None, key: str) -> float | None:
    value = (data or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize(
    runs: Sequence[Run],
    metrics_by_run: dict[str, list[Metric]],
    run_json_by_run: dict[str, dict | None],
    paths: Sequence[str] = (),
) -> list[SweepRow]:
    """One row per run, in the order given. Final losses are the last logged ones; trainable parameters
    and peak memory come from RUN_DIR/adapter/run.json (written when a run completes), peak memory from
    the logged points while it runs."""
    rows = []
    for run in runs:
        metrics = metrics_by_run.get(run.id) or []
        info = run_json_by_run.get(run.id) or {}
        trainable = _number(info, "trainable_parameters")
        peak = _number(info, "peak_memory_mb")
        if peak is None:
            logged = [m.memory_mb for m in metrics if m.memory_mb is not None]
            peak = max(logged) if logged else None
        seconds = run.duration_s if run.started_at is not None else _number(info, "train_runtime_s")
        rows.append(
            SweepRow(
                run_id=run.id,
                name=run.name,
                values=values_of(run.config, paths),
                status=run.status.value,
                final_train_loss=_last(metrics, "loss") if metrics else run.final_loss,
                final_eval_loss=_last(metrics, "eval_loss"),
                trainable_params=int(trainable) if trainable is not None else None,
                seconds=seconds,
                peak_memory_mb=peak,
            )
        )
    return rows


def _size_key(row: SweepRow) -> tuple:
    """Smaller first: rank, then trainable parameters (unknown ones last)."""
    r = row.values.get("lora.r")
    return (r if isinstance(r, (int, float)) else 0, row.trainable_params if row.trainable_params else math.inf)


def _size_words(pick: SweepRow, other: SweepRow) -> str:
    if pick.trainable_params and other.trainable_params:
        return f"fewer trainable parameters ({pick.trainable_params:,} vs {other.trainable_params:,})"
    return f"a smaller rank ({_fmt(pick.values.get('lora.r'))} vs {_fmt(other.values.get('lora.r'))})"


def recommend(rows: Sequence[SweepRow], tolerance: float = TIE_TOLERANCE) -> Pick | None:
    """The completed run with the best final eval loss; runs within `tolerance` (relative) of the best tie
    and go to the smaller rank (fewer trainable parameters). Without any eval loss, the final train loss
    decides and the reason says why that is weaker. None while no run has completed."""
    done = [r for r in rows if r.status == RunStatus.COMPLETED.value]
    scored = [(r, r.final_eval_loss) for r in done if r.final_eval_loss is not None]
    metric, label = "eval_loss", "eval loss"
    if not scored:
        scored = [(r, r.final_train_loss) for r in done if r.final_train_loss is not None]
        metric, label = "loss", "train loss"
    if not scored:
        return None
    ranked = sorted(scored, key=lambda x: x[1])
    best_row, best = ranked[0]
    tied = [(r, loss) for r, loss in scored if loss - best <= tolerance * abs(best)]
    pick_row, pick_loss = min(tied, key=lambda x: (*_size_key(x[0]), x[1]))
    pick_vals, best_vals = format_values(pick_row.values) or pick_row.name, format_values(best_row.values)
    if pick_row is not best_row:
        reason = (
            f"{best_vals} has the lowest final {label} ({best:.4f}), but {pick_vals} is within "
            f"{tolerance:.0%} of it ({pick_loss:.4f}) with {_size_words(pick_row, best_row)}: a difference that "
            "small is noise in a short scan, so the smaller adapter is recommended."
        )
    elif len(ranked) > 1:
        runner_row, runner = ranked[1]
        gap = (runner - best) / abs(best) if best else 0.0
        reason = (
            f"{pick_vals} has the lowest final {label}: {best:.4f}, against {runner:.4f} "
            f"({gap:+.1%}) for the next best, {format_values(runner_row.values) or runner_row.name}."
        )
    else:
        reason = f"{pick_vals} is the only run with a final {label} so far ({best:.4f})."
    if metric == "loss":
        reason += (
            " No eval loss was logged (data.val_size is 0), so this compares final train loss, which favours "
            "bigger ranks: they fit the training data more closely, not necessarily better. Set data.val_size "
            "(e.g. 0.1) and sweep again for a pick made on held-out data."
        )
    pending = [r for r in rows if r.status in (RunStatus.QUEUED.value, RunStatus.RUNNING.value)]
    stopped = [r for r in rows if r not in pending and r.status != RunStatus.COMPLETED.value]
    if pending:
        reason += f" {len(pending)} of {len(rows)} runs have not finished yet; the pick may change."
    if stopped:
        names = "; ".join(f"{format_values(r.values) or r.name} ({r.status})" for r in stopped)
        reason += f" Not compared: {names}."
    return Pick(run_id=pick_row.run_id, values=dict(pick_row.values), reason=reason, metric=metric, loss=pick_loss)


def parse_params(texts: Sequence[str]) -> list[SweepParam]:
    """Every --param, with the problems of all of them reported together."""
    params, problems = [], []
    for text in texts:
        try:
            params.append(parse_param(text))
        except SweepError as err:
            problems += err.problems
    if problems:
        raise SweepError(problems)
    return params
