"""One training run: model + data + LoRA through a stage's trainer, reporting into a MetricSink.

`run_training` knows nothing of processes or the store: the worker gives it a sink and a stop flag. What
differs between ways of training (data, collator, trainer class) is the stage's (studio.training.stages);
the steps here are the same for every stage.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.core.config import BNB_OPTIMIZERS, SHARDING, RunConfig, device_problems
from studio.core.fsutil import atomic_write_json
from studio.core.workspace import RunDir, checkpoint_step
from studio.model.loading import (
    ResolvedModel,
    cpu_has_bf16,
    detect_device,
    load_model,
    load_tokenizer,
    resolve_model,
    slow_bf16_hint,
)
from studio.model.targets import expand_targets, linear_layer_names, target_problem
from studio.training.coach import Advice, data_advice, write_data_facts
from studio.training.errors import TrainingError
from studio.training.launch import RankInfo, RankReport, lora_digest, rank_info, write_rank_report
from studio.training.meter import TokenCounter, finite, throughput
from studio.training.sink import EVENT_LEVEL, MetricSink
from studio.training.stages import Stage, StageData, get_stage

if TYPE_CHECKING:
    from studio.training.callbacks import StudioCallback


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


def _training_args(config: RunConfig, run_dir: Path, device: str, has_eval: bool, stage: Stage):
    """The stage's TrainingArguments class, with what every stage shares and the stage's own arguments."""
    arguments_class, own = stage.arguments(config)
    t = config.train
    optim, _ = resolve_optimizer(t.optimizer, device, bnb_available())
    return arguments_class(
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
        **checkpointing_args(t.gradient_checkpointing, arguments_class),
        **sampling_args(config.data.group_by_length and not config.data.packing, arguments_class),
        **own,
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


def _drop_checkpoints_after(run_dir: Path, step: int) -> list[str]:
    """Remove checkpoints saved at or after `step`: they hold a diverged state, and resuming from one would
    only diverge again."""
    dropped = []
    for path in RunDir(run_dir).checkpoint_dirs():
        if checkpoint_step(path) >= step:
            shutil.rmtree(path, ignore_errors=True)
            dropped.append(path.name)
    return dropped


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


def start_adapter(config: RunConfig, home: Path) -> Path | None:
    """The adapter folder of the run this one starts from (preference.start_from), or None for a fresh
    adapter. The submit check (studio.runs.preflight) has already said what is wrong with a bad one."""
    run_id = config.preference.start_from.strip()
    if not run_id:
        return None
    from studio.core.store import Store
    from studio.core.workspace import db_path

    run = Store(db_path(home)).get_run(run_id)
    if not RunDir.is_adapter(run.adapter_dir):
        raise TrainingError(f"Run {run_id} has no adapter to start from (looked in {run.adapter_dir}).")
    return Path(run.adapter_dir)


def write_run_json(path: Path, config: RunConfig, model: ResolvedModel, result: dict[str, Any]) -> None:
    """What made this adapter: base model, config, outcome. Written last, so its presence means done."""
    body = {
        "base_model": {"kind": model.kind, "name": model.name, "path": model.path, "source": config.model.source},
        "config": config.to_dict(),
        **result,
    }
    atomic_write_json(path / RunDir.RUN_JSON, body)


@dataclass
class _Run:
    """What every step of one run reads: its config and folder, where it reports, where it runs."""

    config: RunConfig
    run_dir: Path
    sink: MetricSink
    should_stop: Callable[[], bool]
    home: Path
    stage: Stage
    device: str
    rank: RankInfo
    model: ResolvedModel
    started: float


@dataclass
class _Session:
    """The trainer part of a run: the trainer, its callback, the token meter, the LoRA model."""

    trainer: Any
    callback: StudioCallback
    counter: TokenCounter
    model: Any
    trainable: int


@dataclass
class _Trained:
    """What training came to: the last step, the last training loss, the speed."""

    step: int
    final_loss: float | None
    throughput: dict[str, float]


def run_training(
    config: RunConfig,
    run_dir: Path,
    sink: MetricSink,
    should_stop: Callable[[], bool] = lambda: False,
    resume_from: str | None = None,
    *,
    home: Path,
) -> TrainResult:
    """Train one adapter: runtime, data (the stage's), model + LoRA, the stage's trainer, then save."""
    started = time.perf_counter()
    run = _resolve_runtime(config, Path(run_dir), sink, should_stop, home, get_stage(config.stage), started)
    tokenizer = load_tokenizer(run.model, config.model.trust_remote_code)
    data = _build_data(run, tokenizer)
    if should_stop() and not run.rank.distributed:  # launched processes agree on stopping at a step end instead
        return TrainResult("aborted", 0, None, None, None, len(data.train), len(data.eval), 0.0)
    model, trainable = _load_lora_model(run)
    session = _build_trainer(run, model, trainable, tokenizer, data)
    trained = _train(run, session, resume_from)
    callback = session.callback
    if callback.diverged is not None:
        raise TrainingError(_divergence_message(callback.diverged, trained.step, run.run_dir, callback.points))
    checkpoint = RunDir(run.run_dir).latest_checkpoint()
    if callback.aborted:
        return _stopped(run, session, trained, data, checkpoint)
    return _save_adapter(run, session, trained, data, tokenizer, checkpoint)


def _resolve_runtime(
    config: RunConfig,
    run_dir: Path,
    sink: MetricSink,
    should_stop: Callable[[], bool],
    home: Path,
    stage: Stage,
    started: float,
) -> _Run:
    """Check the config against this machine, fix threads and seed, find the base model."""
    import torch
    from transformers import set_seed

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
    q = config.quant
    hint = slow_bf16_hint(config.train.compute_type, q.mode, q.compute_dtype, device, cpu_has_bf16())
    if hint:
        sink.event(hint, "warning")
    return _Run(config, run_dir, sink, should_stop, home, stage, device, rank, resolved, started)


def _build_data(run: _Run, tokenizer) -> StageData:
    """The stage's rows; what the coach reads about them is written for the UI and said as advice."""
    data = run.stage.build_data(run.config, tokenizer, run.home)
    run.sink.event(run.stage.describe(data, run.config))
    if data.facts is not None and run.rank.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_data_facts(run.run_dir, data.facts)  # the coach's view of the data, for the UI while the run goes
        for advice in data_advice(data.facts, run.config):
            run.sink.event(advice.text(), EVENT_LEVEL[advice.severity])
    return data


def _load_lora_model(run: _Run) -> tuple[Any, int]:
    """The base model (quantized when asked) with LoRA on its target layers, and its trainable count."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    config = run.config
    quant = config.quant if config.quant.mode != "none" else None
    model = load_model(
        run.model,
        config.train.compute_type,
        quant,
        load_device(config, run.device, run.rank),
        config.model.trust_remote_code,
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
    start = start_adapter(config, run.home)
    if start is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, start, is_trainable=True)
        run.sink.event(f"Starting from the adapter of run {config.preference.start_from} (its rank and targets)")
    else:
        model = get_peft_model(model, lora_config(config, linear_layer_names(model)))
    trainable, total = model.get_nb_trainable_parameters()
    run.sink.event(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    return model, trainable


def _build_trainer(run: _Run, model, trainable: int, tokenizer, data: StageData) -> _Session:
    """The stage's trainer over its data and collator, with the studio's callback and optimizer."""
    from studio.training.callbacks import StudioCallback

    config = run.config
    args = _training_args(config, run.run_dir, run.device, bool(data.eval), run.stage)
    _, optimizer_note = resolve_optimizer(config.train.optimizer, run.device, bnb_available())
    if optimizer_note:
        run.sink.event(optimizer_note, "warning")
    counter = TokenCounter()
    callback = StudioCallback(run.sink, run.should_stop, counter, run.device, config, run.rank)
    trainer = run.stage.make_trainer(
        config,
        model=model,
        args=args,
        data=data,
        tokenizer=tokenizer,
        counter=counter,
        callbacks=[callback],
        optimizers=_make_optimizer(config, model, args),
    )
    return _Session(trainer, callback, counter, model, trainable)


def _train(run: _Run, session: _Session, resume_from: str | None) -> _Trained:
    """Train (from a checkpoint when resuming) and say how fast it went."""
    if resume_from:
        run.sink.event(f"Resuming from {Path(resume_from).name}")
    output = session.trainer.train(resume_from_checkpoint=resume_from)
    speed = throughput(output.metrics.get("train_runtime"), session.counter, run.device, run.rank)
    run.sink.event(
        f"Trained {speed['real_tokens']:,} real tokens in {speed['train_runtime_s']:.1f} s "
        f"({speed['tokens_per_s']:,.0f} tokens/s); padding {100 * speed['padding_share']:.1f}% of positions"
        + (f"; {run.rank.world_size} processes" if run.rank.distributed else "")
    )
    state = session.trainer.state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    final_loss = float(losses[-1]) if losses else finite(output.training_loss)
    return _Trained(state.global_step, final_loss, speed)


def _stopped(run: _Run, session: _Session, trained: _Trained, data: StageData, checkpoint: Path | None) -> TrainResult:
    """A stop request ended the run: the checkpoint saved at its last step is what is kept."""
    if run.rank.distributed:
        write_rank_report(run.run_dir, _rank_report(run.rank, session.trainer, session.counter, session.model))
    run.sink.event(f"Stopped at step {trained.step}; checkpoint saved at {checkpoint}", "warning")
    return TrainResult(
        "aborted",
        trained.step,
        trained.final_loss,
        None,
        str(checkpoint) if checkpoint else None,
        len(data.train),
        len(data.eval),
        time.perf_counter() - run.started,
    )


def _save_adapter(
    run: _Run, session: _Session, trained: _Trained, data: StageData, tokenizer, checkpoint: Path | None
) -> TrainResult:
    """The finished run: the adapter (the best state after early stopping), its tokenizer and run.json."""
    from studio.training.callbacks import early_stop_summary

    rank = run.rank
    early = early_stop_summary(session.callback, run.sink)
    if rank.distributed:  # after early stopping put the best weights back: these are what is saved
        write_rank_report(run.run_dir, _rank_report(rank, session.trainer, session.counter, session.model))
    adapter_dir = RunDir(run.run_dir).adapter
    if run.config.distribution.strategy in SHARDING and rank.distributed:
        session.trainer.save_model(str(adapter_dir))  # every process hands in its shard; the main one writes
    elif rank.main:
        adapter_dir.mkdir(parents=True, exist_ok=True)
        # Only the trained adapter: a preference trainer adds a frozen "ref" copy of the starting one.
        session.model.save_pretrained(adapter_dir, selected_adapters=["default"])
    done = TrainResult(
        "completed", trained.step, trained.final_loss, str(adapter_dir), None, len(data.train), len(data.eval), 0.0
    )
    if not rank.main:
        return done
    tokenizer.save_pretrained(adapter_dir)
    seconds = time.perf_counter() - run.started
    write_run_json(adapter_dir, run.config, run.model, _results(run, session, trained, data, seconds, early))
    run.sink.event(f"Adapter saved to {adapter_dir}")
    return dataclasses.replace(done, checkpoint_dir=str(checkpoint) if checkpoint else None, seconds=seconds)


def _results(
    run: _Run, session: _Session, trained: _Trained, data: StageData, seconds: float, early: dict[str, Any]
) -> dict[str, Any]:
    """What run.json records of the outcome."""
    return {
        "global_step": trained.step,
        "final_loss": trained.final_loss,
        "train_samples": len(data.train),
        "eval_samples": len(data.eval),
        "trainable_parameters": session.trainable,
        "processes": run.rank.world_size,
        "seconds": round(seconds, 2),
        **trained.throughput,
        **early,
    }


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
