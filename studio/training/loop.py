"""One training run: model + data + LoRA through transformers' Trainer, reporting into a MetricSink.

`run_training` knows nothing of processes or the store: the worker gives it a sink and a stop flag.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import random
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from studio.core.config import BNB_OPTIMIZERS, SHARDING, RunConfig, device_problems
from studio.core.errors import ExitCode, StudioError
from studio.core.fsutil import atomic_write_json
from studio.core.workspace import RunDir, checkpoint_step
from studio.model.loading import (
    ResolvedModel,
    detect_device,
    load_model,
    load_tokenizer,
    resolve_model,
)
from studio.model.targets import expand_targets, linear_layer_names, target_problem
from studio.training.coach import (
    Advice,
    DataFacts,
    curve_advice,
    data_advice,
    data_facts,
    divergence_stop,
    early_stop_due,
    points_from_log_history,
    write_data_facts,
)
from studio.training.launch import (
    RankInfo,
    RankReport,
    any_rank,
    lora_digest,
    rank_info,
    reduce_over_ranks,
    write_rank_report,
)

HELD_OUT = "held_out"  # marks eval rows for the collator
IGNORE = -100


class TrainingError(StudioError, RuntimeError):
    """A run cannot start or continue; the message says why and what to change."""

    exit_code = ExitCode.FAILED


class MetricSink(Protocol):
    def log(self, step: int, **values: float | None) -> None: ...
    def event(self, message: str, level: str = "info") -> None: ...
    def progress(self, step: int, total: int) -> None: ...


@dataclass
class TrainResult:
    status: str  # "completed" | "aborted"
    global_step: int
    final_loss: float | None
    adapter_dir: str | None
    checkpoint_dir: str | None
    train_samples: int
    eval_samples: int
    seconds: float


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    lengths: list[int]
    truncated: int
    packed: bool
    facts: DataFacts | None = None  # what the coach reads about the data (truncation, EOS, size)


@dataclass
class TokenCounter:
    """Training tokens handed to the model; the collator adds, the speed meter reads. `total` counts real
    tokens, `positions` every position computed (padding included); held-out rows are not counted."""

    total: int = 0
    positions: int = 0
    samples: int = 0

    @property
    def padding_share(self) -> float:
        return 1 - self.total / self.positions if self.positions else 0.0


@dataclass
class Collator:
    pad_id: int
    counter: TokenCounter = field(default_factory=TokenCounter)
    pad_to: int | None = None  # pad every batch to this width (constant shapes) instead of its longest row

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to:
            width = max(width, self.pad_to)
        packed = "position_ids" in features[0]
        ids, labels, mask, positions = [], [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = width - n
            ids.append(f["input_ids"] + [self.pad_id] * pad)
            labels.append(f["labels"] + [IGNORE] * pad)
            mask.append([1] * n + [0] * pad)
            if packed:
                # Padding gets its own position run, so it forms a separate (fully masked) segment.
                positions.append(f["position_ids"] + list(range(pad)))
            if not f.get(HELD_OUT):
                self.counter.total += n
                self.counter.positions += width
                self.counter.samples += 1
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if packed:
            # No attention_mask: transformers then derives a block-diagonal mask from the position ids,
            # so packed samples never attend to each other (sdpa and eager alike; only without a KV cache,
            # hence use_cache=False in run_training; tests/unit/test_train_batches.py checks it).
            batch["position_ids"] = torch.tensor(positions)
        else:
            batch["attention_mask"] = torch.tensor(mask)
        return batch


def split_indices(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(eval, train) indices into n samples: a seeded shuffle, the first round(n * val_size) held out (at
    least one when val_size > 0). Training, evaluation and the dataset doctor's leakage check share it, so
    `studio eval` scores exactly the rows a run never trained on."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = round(n * val_size) if val_size > 0 else 0
    if val_size > 0 and n_eval == 0:
        n_eval = 1
    if n_eval >= n:
        raise TrainingError(f"val_size={val_size} leaves no training samples out of {n}. Lower data.val_size.")
    return order[:n_eval], order[n_eval:]


@dataclass
class SplitData:
    """Examples and their tokenized samples (those with at least one trained token), split as training
    splits them."""

    train_examples: list[Any]
    eval_examples: list[Any]
    train_samples: list[Any]
    eval_samples: list[Any]
    lengths: list[int]  # every kept sample's untruncated length
    truncated: int
    dropped: int  # samples with no trained token left (answer cut off, or labels all masked)


def split_data(config: RunConfig, tokenizer, home: Path | None = None) -> SplitData:
    """Registered datasets -> tokenized, masked samples, split into train and eval like training does."""
    from studio.data import DatasetRegistry, build_sample

    registry = DatasetRegistry(home) if home is not None else DatasetRegistry()
    pairs = []
    total = 0
    for name in config.data.datasets:
        examples = registry.load_examples(name)
        if config.data.max_samples:
            examples = examples[: config.data.max_samples]
        for ex in examples:
            total += 1
            sample = build_sample(tokenizer, ex, config.data.cutoff_len, config.data.train_on_prompt)
            if any(label != IGNORE for label in sample.labels):
                pairs.append((ex, sample))
    if not pairs:
        raise TrainingError(
            "No sample has a trained token left after tokenization: every answer was cut off by cutoff_len "
            f"({config.data.cutoff_len}). Raise data.cutoff_len."
        )
    eval_idx, train_idx = split_indices(len(pairs), config.data.val_size, config.train.seed)
    return SplitData(
        train_examples=[pairs[i][0] for i in train_idx],
        eval_examples=[pairs[i][0] for i in eval_idx],
        train_samples=[pairs[i][1] for i in train_idx],
        eval_samples=[pairs[i][1] for i in eval_idx],
        lengths=[s.full_length for _, s in pairs],
        truncated=sum(1 for _, s in pairs if s.truncated),
        dropped=total - len(pairs),
    )


def prepare_data(config: RunConfig, tokenizer, home: Path | None = None) -> PreparedData:
    """Registered datasets -> tokenized, masked samples, split into train and eval, optionally packed."""
    from studio.data import pack_samples

    split = split_data(config, tokenizer, home)

    def as_row(s, held_out: bool = False) -> dict[str, Any]:
        row: dict[str, Any] = {"input_ids": list(s.input_ids), "labels": list(s.labels)}
        if held_out:
            row[HELD_OUT] = True  # eval batches stay out of the training-speed count
        return row

    if config.data.packing:
        train = [
            {"input_ids": list(p.input_ids), "labels": list(p.labels), "position_ids": list(p.position_ids)}
            for p in pack_samples(split.train_samples, config.data.cutoff_len)
        ]
    else:
        train = [as_row(s) for s in split.train_samples]
    return PreparedData(
        train=train,
        eval=[as_row(s, held_out=True) for s in split.eval_samples],
        lengths=split.lengths,
        truncated=split.truncated,
        packed=config.data.packing,
        facts=data_facts(
            [s.labels for s in (*split.train_samples, *split.eval_samples)],
            getattr(tokenizer, "eos_token_id", None),
            split.truncated,
            split.dropped,
            config.data.cutoff_len,
        ),
    )


def lora_config(config: RunConfig, available: list[str]):
    """peft's LoraConfig for our LoraSpec; unknown target modules are an error naming the choices."""
    from peft import LoraConfig

    spec = config.lora
    problem = target_problem(spec.target_modules, available)
    if problem:
        raise TrainingError(str(problem))
    targets = expand_targets(spec.target_modules, available)
    init: bool | str = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[spec.init]
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias=spec.bias,
        use_rslora=spec.use_rslora,
        use_dora=spec.use_dora,
        init_lora_weights=init,
        task_type="CAUSAL_LM",
    )


def check_runtime(config: RunConfig, device: str) -> None:
    """Combinations the hardware refuses, caught before minutes of loading; every reason in one message."""
    import torch

    problems = [str(p) for p in device_problems(config, device)]
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        if config.train.compute_type == "bf16":
            problems.append("This GPU has no bf16 support: set train.compute_type to fp16 (with loss scaling) or fp32.")
        if config.quant.mode == "4bit" and config.quant.compute_dtype == "bf16":
            problems.append("This GPU has no bf16 support: set quant.compute_dtype to fp16.")
    strategy = config.distribution.strategy
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        problems.append(
            f"distribution.strategy '{strategy}' needs DeepSpeed: pip install deepspeed (on a CUDA machine), "
            "or use 'fsdp' or 'ddp'."
        )
    if config.quant.mode != "none" and not bnb_available():
        problems.append("Quantized training needs bitsandbytes: pip install bitsandbytes (or set quant.mode to none).")
    if problems:
        raise TrainingError(" ".join(problems))


def bnb_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def resolve_optimizer(name: str, device: str, have_bnb: bool = True) -> tuple[str, str | None]:
    """The optimizer the Trainer gets on this device, and why it differs from the one asked for (or None)."""
    if name not in BNB_OPTIMIZERS:
        return name, None
    if device == "mps" or not have_bnb:
        why = "bitsandbytes has no Apple MPS backend" if device == "mps" else "bitsandbytes is not installed"
        return "adamw_torch", f"{name} needs bitsandbytes and {why}: using adamw_torch (32-bit states, more memory)."
    if device == "cpu" and name.startswith("paged_"):
        # Paging moves optimizer states to CPU RAM through CUDA unified memory; on CPU they live there already.
        # transformers has no plain "adamw_32bit": 32-bit AdamW is torch's own.
        plain = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_torch"}[name]
        return plain, f"{name}: paging needs CUDA unified memory; on CPU the states are in RAM already: using {plain}."
    return name, None


def _throughput(runtime: Any, counter: TokenCounter, device: str, rank: RankInfo = RankInfo()) -> dict[str, float]:
    """The training loop's speed: real tokens over the Trainer's own train_runtime (this session's part of
    the run when resumed), the padding share and the process's peak memory. With several processes the
    tokens are every process's together (a collective: every process calls this)."""
    runtime = _num(runtime) or 0.0
    total, positions = counter.total, counter.positions
    if rank.distributed:
        where = f"cuda:{rank.local_rank}" if device == "cuda" else "cpu"
        total, positions = reduce_over_ranks([total, positions], "sum", where)
    return {
        "train_runtime_s": round(runtime, 3),
        "real_tokens": total,
        "tokens_per_s": round(total / runtime, 2) if runtime > 0 else 0.0,
        "padding_share": round(1 - total / positions, 4) if positions else 0.0,
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
    }


def load_device(config: RunConfig, device: str, rank: RankInfo) -> str:
    """Where this process loads the base: its own GPU when launched (cuda:LOCAL_RANK), the CPU when a
    sharding strategy places the weights itself, else the device."""
    if rank.distributed and config.distribution.strategy in SHARDING:
        return "cpu"
    if rank.distributed and device == "cuda":
        return f"cuda:{rank.local_rank}"
    return device


def _rank_report(rank: RankInfo, trainer, counter: TokenCounter, model) -> RankReport:
    """What this process did, for the run folder: its share of the data and the weights it ended with
    (equal on every process of a data-parallel run)."""
    import os

    from peft import get_peft_model_state_dict

    return RankReport(
        rank=rank.rank,
        world_size=rank.world_size,
        pid=os.getpid(),
        global_step=trainer.state.global_step,
        samples=counter.samples,
        real_tokens=counter.total,
        lora_sha256=lora_digest(get_peft_model_state_dict(model)),
    )


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _training_args(config: RunConfig, run_dir: Path, device: str, has_eval: bool):
    from transformers import TrainingArguments

    t = config.train
    optim, _ = resolve_optimizer(t.optimizer, device, bnb_available())
    return TrainingArguments(
        output_dir=str(RunDir(run_dir).checkpoints),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
        weight_decay=t.weight_decay,
        optim=optim,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.compute_type == "bf16",
        fp16=t.compute_type == "fp16",
        use_cpu=device == "cpu",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to="none",
        # A NaN/inf loss reaches the logs as it is: the default filter swaps it for the running average, which
        # hides a diverged run from the coach (and from the user) behind plausible numbers.
        logging_nan_inf_filter=False,
        disable_tqdm=True,
        remove_unused_columns=False,
        # Launched runs: every LoRA weight takes part in each forward, so DDP need not search for unused
        # ones (an extra pass over the graph each step; and needed off with gradient checkpointing).
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=device == "cuda",
        **checkpointing_args(t.gradient_checkpointing, TrainingArguments),
        **sampling_args(config.data.group_by_length and not config.data.packing, TrainingArguments),
    )


def sampling_args(group_by_length: bool, arguments_class: type) -> dict[str, Any]:
    """Length-grouped batches (samples of similar length share a batch, so less padding), under this
    transformers' name for it: `train_sampling_strategy` in 5.x, the `group_by_length` flag before."""
    if not group_by_length:
        return {}
    names = {f.name for f in dataclasses.fields(arguments_class)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def checkpointing_args(enabled: bool, arguments_class: type) -> dict[str, Any]:
    """Activation checkpointing for TrainingArguments, under the name this transformers uses
    (`activation_checkpointing*` since 5.x; `gradient_checkpointing*` before, now a deprecated alias)."""
    names = {f.name for f in dataclasses.fields(arguments_class)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


EVENT_LEVEL = {"critical": "error", "warning": "warning", "info": "info"}  # coach severity -> event level


@dataclass(frozen=True)
class EarlyStop:
    step: int  # where training stopped
    best_step: int
    best_eval_loss: float
    patience: int


def _studio_callback(
    sink: MetricSink,
    should_stop: Callable[[], bool],
    counter: TokenCounter,
    device: str,
    config: RunConfig | None = None,
    rank: RankInfo = RankInfo(),
):
    from transformers import TrainerCallback

    stop_on_divergence = config is None or config.train.stop_on_divergence
    patience = config.train.early_stopping_patience if config is not None else 0

    class StudioCallback(TrainerCallback):
        """Metrics to the sink at each log; a stop request becomes save-then-stop at the next step. The coach
        reads every log: a diverged run stops at once without saving, early stopping ends a run whose eval loss
        stopped improving, and each other finding becomes an event once."""

        def __init__(self) -> None:
            self.aborted = False
            self.diverged: Advice | None = None
            self.early_stop: EarlyStop | None = None
            self.points: list = []
            self._mark = (time.perf_counter(), 0)
            self._said: set[str] = set()
            self._best: tuple[int, list[tuple[Any, Any]]] | None = None  # (step, [(parameter, cpu copy)])

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark = (time.perf_counter(), counter.total)
            sink.progress(state.global_step, state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            sink.progress(state.global_step, state.max_steps)
            stop = should_stop()
            if rank.distributed:
                stop = any_rank(stop, args.device)  # every process stops at this same step, or none does
            if stop:
                self.aborted = True
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            logs = logs or {}
            values: dict[str, float | None] = {}
            if "loss" in logs:
                now, seen = time.perf_counter(), counter.total
                dt = now - self._mark[0]
                # The run's speed: this process's tokens times the processes (shards are near equal in size).
                values["tokens_per_s"] = (seen - self._mark[1]) * rank.world_size / dt if dt > 0 else None
                self._mark = (now, seen)
                values["loss"] = float(logs["loss"])
                values["learning_rate"] = _num(logs.get("learning_rate"))
                values["grad_norm"] = _num(logs.get("grad_norm"))
                values["memory_mb"] = _peak_memory_mb(device)
            if "eval_loss" in logs:
                values["eval_loss"] = float(logs["eval_loss"])
            if values:
                values["epoch"] = _num(state.epoch)
                sink.log(state.global_step, **values)
                # The whole history (a resumed run's included) with raw floats: NaN stays visible here.
                self.points = points_from_log_history(state.log_history)
                self._coach(state, control, model, "eval_loss" in logs)
            return control

        def _coach(self, state, control, model, evaluated: bool) -> None:
            stop = divergence_stop(self.points) if stop_on_divergence else None
            if stop is not None and self.diverged is None:
                self.diverged = stop
                control.should_training_stop = True
                control.should_save = False  # never checkpoint a broken state
                control.should_evaluate = False
                sink.event(f"Stopping the run: {stop.text()}", EVENT_LEVEL[stop.severity])
                return
            if evaluated and patience > 0 and self.early_stop is None:
                self._early_stopping(state, control, model)
            for advice in curve_advice(self.points, config):
                if advice.rule not in self._said:  # once per run: the curve is on screen, the event is the alert
                    self._said.add(advice.rule)
                    sink.event(advice.text(), EVENT_LEVEL[advice.severity])

        def _early_stopping(self, state, control, model) -> None:
            evals = [(p.step, p.eval_loss) for p in self.points if p.eval_loss is not None]
            finite = [(step, loss) for step, loss in evals if math.isfinite(loss)]
            if not finite:
                return
            best_step, best = min(finite, key=lambda e: e[1])  # the first of equals, as early_stop_due counts
            if model is not None and best_step == evals[-1][0] and self._best_step() != best_step:
                self._best = (best_step, _trainable_copy(model))  # a new best: keep it to restore at the end
            if not early_stop_due([loss for _, loss in evals], patience):
                return
            self.early_stop = EarlyStop(state.global_step, best_step, best, patience)
            control.should_training_stop = True
            sink.event(
                f"Early stopping at step {state.global_step}: eval loss has not improved for {patience} "
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

    return StudioCallback()


def _trainable_copy(model) -> list[tuple[Any, Any]]:
    """The trainable (LoRA) parameters with a CPU copy of each: small next to the model, and restorable in
    place, whatever wrapper the Trainer put around the model."""
    return [(p, p.detach().to("cpu", copy=True)) for p in model.parameters() if p.requires_grad]


def _drop_checkpoints_after(run_dir: Path, step: int) -> list[str]:
    """Remove checkpoints saved at or after `step`: they hold a diverged state, and resuming from one would
    only diverge again."""
    dropped = []
    for path in RunDir(run_dir).checkpoint_dirs():
        if checkpoint_step(path) >= step:
            shutil.rmtree(path, ignore_errors=True)
            dropped.append(path.name)
    return dropped


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _make_optimizer(config: RunConfig, model, args):
    """LoRA+ gives B a larger learning rate than A; otherwise the Trainer builds the optimizer."""
    if not config.lora.loraplus_lr_ratio:
        return (None, None)
    import torch
    from peft.optimizers import create_loraplus_optimizer

    opt = create_loraplus_optimizer(
        model=model,
        optimizer_cls=torch.optim.AdamW,
        lr=config.train.learning_rate,
        loraplus_lr_ratio=config.lora.loraplus_lr_ratio,
        weight_decay=config.train.weight_decay,
    )
    return (opt, None)


def write_run_json(path: Path, config: RunConfig, model: ResolvedModel, result: dict[str, Any]) -> None:
    """What made this adapter: base model, config, outcome. Written last, so its presence means done."""
    body = {
        "base_model": {"kind": model.kind, "name": model.name, "path": model.path, "source": config.model.source},
        "config": config.to_dict(),
        **result,
    }
    atomic_write_json(path / RunDir.RUN_JSON, body)


def run_training(
    config: RunConfig,
    run_dir: Path,
    sink: MetricSink,
    should_stop: Callable[[], bool] = lambda: False,
    resume_from: str | None = None,
    home: Path | None = None,
) -> TrainResult:
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, set_seed

    started = time.perf_counter()
    run_dir = Path(run_dir)
    config.check()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    device = detect_device(config.train.device)
    check_runtime(config, device)
    rank = rank_info()
    set_seed(config.train.seed)

    resolved = resolve_model(config.model.source)
    sink.event(
        f"Model: {resolved.name} ({resolved.kind}) on {device}, compute {config.train.compute_type}"
        + (f", base in {config.quant.mode}" if config.quant.mode != "none" else "")
    )
    tokenizer = load_tokenizer(resolved, config.model.trust_remote_code)
    data = prepare_data(config, tokenizer, home)
    lengths = sorted(data.lengths)
    sink.event(
        f"Data: {len(data.train)} train {'blocks (packed)' if data.packed else 'samples'}, {len(data.eval)} eval; "
        f"tokens per sample median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
        f"{data.truncated} of {len(lengths)} cut at {config.data.cutoff_len}"
    )
    if data.facts is not None and rank.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_data_facts(run_dir, data.facts)  # the coach's view of the data, for the UI while the run goes
        for advice in data_advice(data.facts, config):
            sink.event(advice.text(), EVENT_LEVEL[advice.severity])
    if should_stop() and not rank.distributed:  # launched processes agree on stopping at a step end instead
        return TrainResult("aborted", 0, None, None, None, len(data.train), len(data.eval), 0.0)

    quant = config.quant if config.quant.mode != "none" else None
    model = load_model(
        resolved, config.train.compute_type, quant, load_device(config, device, rank), config.model.trust_remote_code
    )
    if quant is not None:
        # Freezes the quantized base and upcasts the rest to fp32; non-reentrant checkpointing passes
        # gradients back to the LoRA weights without making the inputs require grad.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif config.train.gradient_checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad into checkpoints
    model.config.use_cache = False
    available = linear_layer_names(model)
    model = get_peft_model(model, lora_config(config, available))
    trainable, total = model.get_nb_trainable_parameters()
    sink.event(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")

    args = _training_args(config, run_dir, device, bool(data.eval))
    _, optimizer_note = resolve_optimizer(config.train.optimizer, device, bnb_available())
    if optimizer_note:
        sink.event(optimizer_note, "warning")
    counter = TokenCounter()
    callback = _studio_callback(sink, should_stop, counter, device, config, rank)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval or None,
        data_collator=Collator(
            tokenizer.pad_token_id, counter, pad_to=config.data.cutoff_len if config.data.pad_to_cutoff else None
        ),
        processing_class=tokenizer,
        callbacks=[callback],
        optimizers=_make_optimizer(config, model, args),
    )
    if resume_from:
        sink.event(f"Resuming from {Path(resume_from).name}")
    output = trainer.train(resume_from_checkpoint=resume_from)
    throughput = _throughput(output.metrics.get("train_runtime"), counter, device, rank)
    sink.event(
        f"Trained {throughput['real_tokens']:,} real tokens in {throughput['train_runtime_s']:.1f} s "
        f"({throughput['tokens_per_s']:,.0f} tokens/s); padding {100 * throughput['padding_share']:.1f}% of positions"
        + (f"; {rank.world_size} processes" if rank.distributed else "")
    )
    step = trainer.state.global_step
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    final_loss = float(losses[-1]) if losses else _num(output.training_loss)
    if callback.diverged is not None:
        raise TrainingError(_divergence_message(callback.diverged, step, run_dir, callback.points))
    checkpoint = RunDir(run_dir).latest_checkpoint()
    if callback.aborted:
        if rank.distributed:
            write_rank_report(run_dir, _rank_report(rank, trainer, counter, model))
        sink.event(f"Stopped at step {step}; checkpoint saved at {checkpoint}", "warning")
        return TrainResult(
            "aborted",
            step,
            final_loss,
            None,
            str(checkpoint) if checkpoint else None,
            len(data.train),
            len(data.eval),
            time.perf_counter() - started,
        )

    early = _early_stop_summary(callback, sink)
    if rank.distributed:  # after early stopping put the best weights back: these are what is saved
        write_rank_report(run_dir, _rank_report(rank, trainer, counter, model))
    adapter_dir = RunDir(run_dir).adapter
    if config.distribution.strategy in SHARDING and rank.distributed:
        trainer.save_model(str(adapter_dir))  # every process hands in its shard; the main one writes
    elif rank.main:
        adapter_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(adapter_dir)
    if not rank.main:
        return TrainResult("completed", step, final_loss, str(adapter_dir), None, len(data.train), len(data.eval), 0.0)
    tokenizer.save_pretrained(adapter_dir)
    seconds = time.perf_counter() - started
    write_run_json(
        adapter_dir,
        config,
        resolved,
        {
            "global_step": step,
            "final_loss": final_loss,
            "train_samples": len(data.train),
            "eval_samples": len(data.eval),
            "trainable_parameters": trainable,
            "processes": rank.world_size,
            "seconds": round(seconds, 2),
            **throughput,
            **early,
        },
    )
    sink.event(f"Adapter saved to {adapter_dir}")
    return TrainResult(
        "completed",
        step,
        final_loss,
        str(adapter_dir),
        str(checkpoint) if checkpoint else None,
        len(data.train),
        len(data.eval),
        seconds,
    )


def _divergence_message(advice: Advice, step: int, run_dir: Path, points: list) -> str:
    """The failed run's error: what happened, what to change, and what was kept. Checkpoints saved from the
    last healthy log on hold weights that already produced the bad losses, so they go."""
    healthy = [p.step for p in points if p.loss is not None and p.step < (advice.step or step)]
    dropped = _drop_checkpoints_after(run_dir, healthy[-1] if healthy else 0)
    kept = RunDir(run_dir).latest_checkpoint()
    after = (
        f"Removed {', '.join(dropped)} (saved after the trouble began). " if dropped else "Nothing diverged was saved. "
    )
    after += f"The last good checkpoint is {kept.name}." if kept else "No checkpoint from before it was kept."
    return (
        f"Stopped at step {step} because {advice.title[0].lower() + advice.title[1:]}: {advice.detail} "
        f"Fix: {advice.fix} {after} (The coach stops such runs while train.stop_on_divergence is on.)"
    )


def _early_stop_summary(callback, sink: MetricSink) -> dict[str, Any]:
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
