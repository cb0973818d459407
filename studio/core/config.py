"""Typed run configuration: one dataclass per concern, YAML round-trip, every problem reported at once.

`RunConfig.validate()` returns a list of Problems (empty when the config is good), each naming its field;
the UI shows them as one message and the CLI as one exit. Help texts carry practitioners' defaults (see FIELD-NOTES.md).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from studio.core.errors import StudioError
from studio.core.fsutil import atomic_write
from studio.core.problems import Problem, Problems, as_problem

COMPUTE_TYPES = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
BIAS_MODES = ("none", "lora_only", "all")
LORA_INITS = ("default", "gaussian", "pissa")
QUANT_MODES = ("none", "8bit", "4bit")
QUANT_TYPES = ("nf4", "fp4")
TARGET_GROUPS = ("all-linear", "attention", "q,v")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
# Names as transformers' TrainingArguments(optim=...) spells them.
OPTIMIZERS = (
    "adamw_torch",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
)
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
STRATEGIES = ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")
SHARDING = ("fsdp", "deepspeed-zero3")  # strategies that split the base weights themselves across processes
# Training stages (studio.training.stages): supervised fine-tuning, and preference training on judged answers.
STAGES = ("sft", "dpo", "kto", "orpo")
PREFERENCE_STAGES = ("dpo", "kto", "orpo")
# DPO's losses, as TRL names them; 'simpo' is reference-free (TRL's CPO trainer with the SimPO loss).
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo")


class ConfigError(StudioError, ValueError):
    """A config that cannot be used; `problems` lists every reason, as Problems (a bare sentence becomes a
    Problem about no field)."""

    def __init__(self, problems: list[Problem] | list[str] | list[Problem | str]):
        self.problems: list[Problem] = [as_problem(p) for p in problems]
        super().__init__("Invalid run config:\n- " + "\n- ".join(map(str, self.problems)))

    def one_line(self) -> str:
        return "; ".join(map(str, self.problems))


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ModelSpec:
    source: str = field(
        default="bundled",
        metadata=_help("'bundled' (SmolLM2-135M-Instruct, works offline), a local model folder, or a hub id."),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=_help("Run Python code shipped with the model. Only for models whose code you trust."),
    )

    def validate(self) -> list[Problem]:
        if self.source.strip():
            return []
        return [Problem("model.source", "model.source is empty", "use 'bundled', a folder or a hub id.")]


@dataclass
class LoraSpec:
    r: int = field(default=16, metadata=_help("Rank. 8 for style, 16-32 for domain Q&A, 64-128 for reasoning."))
    alpha: float = field(default=32, metadata=_help("Scale alpha; update is (alpha/r)*B*A. 2*r is the usual choice."))
    dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA path: 0.05-0.1, more for small data."))
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=_help("'all-linear' (recommended), 'attention', 'q,v', or a list of layer names."),
    )
    bias: str = field(default="none", metadata=_help("Train biases: 'none' (usual), 'lora_only' or 'all'."))
    use_rslora: bool = field(default=False, metadata=_help("rsLoRA: scale by alpha/sqrt(r); stable at high rank."))
    use_dora: bool = field(default=False, metadata=_help("DoRA: learn magnitude and direction separately."))
    init: str = field(
        default="default",
        metadata=_help("'default' (B=0, training starts at the base), 'gaussian', or 'pissa' (from W's SVD)."),
    )
    loraplus_lr_ratio: float | None = field(
        default=None, metadata=_help("LoRA+: B learns this many times faster than A (e.g. 16). Empty = off.")
    )

    def validate(self) -> list[Problem]:
        p = Problems()
        if not _is_int(self.r) or self.r < 1:
            p.add("lora.r", f"lora.r must be a whole number of at least 1 (got {self.r!r}); try 8, 16 or 32.")
        elif self.r > 1024:
            p.add("lora.r", f"lora.r={self.r} is far above useful ranks (8-256).")
        if not _is_number(self.alpha) or self.alpha <= 0:
            p.add("lora.alpha", f"lora.alpha must be a positive number (got {self.alpha!r}); 2*r is usual.")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            p.add("lora.dropout", f"lora.dropout must be in [0, 1) (got {self.dropout!r}); 0.05-0.1 is typical.")
        if isinstance(self.target_modules, str):
            if not self.target_modules.strip():
                p.add(
                    "lora.target_modules",
                    "lora.target_modules is empty",
                    "use 'all-linear' or name layers like q_proj,v_proj.",
                )
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            p.add(
                "lora.target_modules",
                "lora.target_modules must list layer names (e.g. [q_proj, v_proj]) or be 'all-linear'.",
            )
        if self.bias not in BIAS_MODES:
            p.add("lora.bias", f"lora.bias must be one of {', '.join(BIAS_MODES)} (got {self.bias!r}).")
        if self.init not in LORA_INITS:
            p.add("lora.init", f"lora.init must be one of {', '.join(LORA_INITS)} (got {self.init!r}).")
        if self.loraplus_lr_ratio is not None and (
            not _is_number(self.loraplus_lr_ratio) or self.loraplus_lr_ratio < 1
        ):
            p.add(
                "lora.loraplus_lr_ratio",
                f"lora.loraplus_lr_ratio must be empty or at least 1 (got {self.loraplus_lr_ratio!r}).",
            )
        return p

    def target_list(self) -> list[str]:
        if isinstance(self.target_modules, list):
            return list(self.target_modules)
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]


@dataclass
class QuantSpec:
    mode: str = field(default="none", metadata=_help("'none', '8bit' or '4bit' (QLoRA) for the frozen base."))
    quant_type: str = field(default="nf4", metadata=_help("4-bit data type: 'nf4' (QLoRA's choice) or 'fp4'."))
    double_quant: bool = field(default=True, metadata=_help("Quantize the scales too: ~0.37 bit/param saved."))
    compute_dtype: str = field(default="bf16", metadata=_help("Dtype the 4-bit weights are unpacked to per matmul."))

    def validate(self) -> list[Problem]:
        p = Problems()
        if self.mode not in QUANT_MODES:
            p.add("quant.mode", f"quant.mode must be one of {', '.join(QUANT_MODES)} (got {self.mode!r}).")
        if self.quant_type not in QUANT_TYPES:
            p.add("quant.quant_type", f"quant.quant_type must be 'nf4' or 'fp4' (got {self.quant_type!r}).")
        if self.compute_dtype not in COMPUTE_TYPES:
            p.add(
                "quant.compute_dtype",
                f"quant.compute_dtype must be one of {', '.join(COMPUTE_TYPES)} (got {self.compute_dtype!r}).",
            )
        return p


@dataclass
class DataSpec:
    datasets: list[str] = field(default_factory=list, metadata=_help("Registered dataset names, mixed in order."))
    cutoff_len: int = field(default=512, metadata=_help("Max tokens per sample; longer ones are cut. 512-2048."))
    max_samples: int | None = field(default=None, metadata=_help("Use at most this many rows per dataset."))
    val_size: float = field(default=0.0, metadata=_help("Share held out for eval loss, e.g. 0.1. 0 = none."))
    packing: bool = field(
        default=False,
        metadata=_help("Pack several samples per sequence, each attending only to itself: far less padding."),
    )
    group_by_length: bool = field(
        default=False,
        metadata=_help(
            "Batch samples of similar length together: less padding, order less random (no packing). "
            "Groups within 4+ megabatches, so it needs 64+ batches of data to matter."
        ),
    )
    pad_to_cutoff: bool = field(
        default=False,
        metadata=_help(
            "Pad every batch to cutoff_len: constant shapes, so a batch too big for memory fails at step 1, "
            "not hours in. Slower: more padding."
        ),
    )
    train_on_prompt: bool = field(default=False, metadata=_help("Also learn the prompts (usually off)."))

    def validate(self) -> list[Problem]:
        p = Problems()
        if not self.datasets:
            p.add("data.datasets", "data.datasets is empty", "pick at least one registered dataset.")
        if not _is_int(self.cutoff_len) or self.cutoff_len < 8:
            p.add("data.cutoff_len", f"data.cutoff_len must be a whole number of at least 8 (got {self.cutoff_len!r}).")
        if self.max_samples is not None and (not _is_int(self.max_samples) or self.max_samples < 1):
            p.add("data.max_samples", f"data.max_samples must be empty or at least 1 (got {self.max_samples!r}).")
        if not _is_number(self.val_size) or not 0 <= self.val_size < 1:
            p.add("data.val_size", f"data.val_size must be in [0, 1) (got {self.val_size!r}); 0.1 is typical.")
        return p


@dataclass
class TrainSpec:
    epochs: float = field(default=3.0, metadata=_help("Passes over the data (ignored when max_steps > 0)."))
    max_steps: int = field(default=0, metadata=_help("Stop after this many optimizer steps; 0 = use epochs."))
    learning_rate: float = field(default=2e-4, metadata=_help("LoRA 1e-4 to 5e-4 (2e-4 a good start); QLoRA lower."))
    lr_scheduler: str = field(default="cosine", metadata=_help("Learning-rate schedule; cosine with warmup is usual."))
    warmup_ratio: float = field(default=0.03, metadata=_help("Share of steps spent warming up the lr (a few %)."))
    batch_size: int = field(default=4, metadata=_help("Samples per device per step."))
    grad_accum: int = field(default=4, metadata=_help("Steps accumulated per update: effective batch = batch x accum."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping, 0.3-1.0. 0 = off."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    optimizer: str = field(default="adamw_torch", metadata=_help("adamw_torch; 8-bit and paged AdamW save memory."))
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("Recompute activations: less memory, ~30% slower.")
    )
    seed: int = field(default=42, metadata=_help("Seed for data order and LoRA init."))
    logging_steps: int = field(default=5, metadata=_help("Log loss, lr and speed every N steps."))
    eval_steps: int = field(default=50, metadata=_help("Evaluate on the validation split every N steps."))
    save_steps: int = field(default=100, metadata=_help("Save a resumable checkpoint every N steps."))
    save_total_limit: int = field(default=3, metadata=_help("Keep at most this many checkpoints."))
    stop_on_divergence: bool = field(
        default=True,
        metadata=_help(
            "Stop automatically when the loss turns NaN or explodes, saying why and what to change; the "
            "checkpoints from before it are kept."
        ),
    )
    early_stopping_patience: int = field(
        default=0,
        metadata=_help(
            "Stop after this many evaluations without a lower eval loss; the adapter is then the best one seen. "
            "0 = off. Needs data.val_size > 0."
        ),
    )
    compute_type: str = field(default="fp32", metadata=_help("bf16 on modern GPUs, fp16 on older ones, fp32 on CPU."))
    device: str = field(default="auto", metadata=_help("'auto' (CUDA, MPS, else CPU) or a fixed device."))
    num_threads: int | None = field(default=None, metadata=_help("CPU threads for training; empty = all cores."))

    def validate(self) -> list[Problem]:
        p = Problems()
        if not _is_int(self.max_steps) or self.max_steps < 0:
            p.add(
                "train.max_steps",
                f"train.max_steps must be 0 (use epochs) or a positive whole number (got {self.max_steps!r}).",
            )
        uses_epochs = not (_is_int(self.max_steps) and self.max_steps > 0)
        if uses_epochs and (not _is_number(self.epochs) or self.epochs <= 0):
            p.add("train.epochs", f"train.epochs must be positive (got {self.epochs!r}), or set train.max_steps.")
        if not _is_number(self.learning_rate) or not 0 < self.learning_rate < 1:
            p.add(
                "train.learning_rate",
                f"train.learning_rate must be in (0, 1) (got {self.learning_rate!r}); 2e-4 is a good start.",
            )
        if self.lr_scheduler not in SCHEDULERS:
            p.add(
                "train.lr_scheduler",
                f"train.lr_scheduler must be one of {', '.join(SCHEDULERS)} (got {self.lr_scheduler!r}).",
            )
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            p.add("train.warmup_ratio", f"train.warmup_ratio must be in [0, 1) (got {self.warmup_ratio!r}).")
        for name in ("batch_size", "grad_accum", "logging_steps", "eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                p.add(f"train.{name}", f"train.{name} must be a whole number of at least 1 (got {value!r}).")
        if not _is_number(self.max_grad_norm) or self.max_grad_norm < 0:
            p.add(
                "train.max_grad_norm", f"train.max_grad_norm must be 0 (off) or positive (got {self.max_grad_norm!r})."
            )
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            p.add("train.weight_decay", f"train.weight_decay must be 0 or positive (got {self.weight_decay!r}).")
        if self.optimizer not in OPTIMIZERS:
            p.add(
                "train.optimizer", f"train.optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})."
            )
        if self.compute_type not in COMPUTE_TYPES:
            p.add(
                "train.compute_type",
                f"train.compute_type must be one of {', '.join(COMPUTE_TYPES)} (got {self.compute_type!r}).",
            )
        if self.device not in DEVICES:
            p.add("train.device", f"train.device must be one of {', '.join(DEVICES)} (got {self.device!r}).")
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
            p.add("train.num_threads", f"train.num_threads must be empty or at least 1 (got {self.num_threads!r}).")
        if not _is_int(self.seed):
            p.add("train.seed", f"train.seed must be a whole number (got {self.seed!r}).")
        if not isinstance(self.stop_on_divergence, bool):
            p.add(
                "train.stop_on_divergence",
                f"train.stop_on_divergence must be true or false (got {self.stop_on_divergence!r}).",
            )
        if not _is_int(self.early_stopping_patience) or self.early_stopping_patience < 0:
            p.add(
                "train.early_stopping_patience",
                "train.early_stopping_patience must be 0 (off) or a whole number of evaluations "
                f"(got {self.early_stopping_patience!r}); 3 is typical.",
            )
        return p


def parse_gpu_ids(text: str | None) -> list[int]:
    """'0,1' -> [0, 1]; '', 'none', 'cpu' -> []. Raises ValueError on anything else."""
    text = (text or "").strip().lower()
    if text in ("", "none", "cpu"):
        return []
    return [int(part) for part in text.split(",") if part.strip()]


@dataclass
class PreferenceSpec:
    """The preference stages' own settings (stage dpo, kto or orpo); an SFT run ignores them."""

    beta: float = field(
        default=0.1,
        metadata=_help(
            "How far the adapter may move from the reference. DPO/KTO 0.1 (0.01-0.5: lower moves more and "
            "overfits sooner); IPO 0.1-1; SimPO 2-2.5; ORPO: the odds-ratio weight, 0.1."
        ),
    )
    loss_type: str = field(
        default="sigmoid",
        metadata=_help(
            "DPO loss: sigmoid (the paper's), ipo (steadier on near-deterministic pairs), hinge (SLiC), "
            "simpo (no reference pass: length-normalised, with a margin)."
        ),
    )
    label_smoothing: float = field(
        default=0.0,
        metadata=_help("Share of pairs assumed mislabelled (conservative DPO): 0.1 for noisy pairs, 0 = off."),
    )
    simpo_gamma: float = field(
        default=0.5,
        metadata=_help("SimPO's target reward margin; gamma/beta around 0.5 (gamma 0.5-1.5 with beta 2-2.5)."),
    )
    sft_weight: float = field(
        default=0.0,
        metadata=_help(
            "DPO: weight of an SFT loss on the chosen answers beside the preference loss (RPO). DPO alone "
            "mostly pushes the rejected answers down; 0.5-1 also makes the chosen text likely, so the answer "
            "itself changes. 0 = plain DPO."
        ),
    )
    desirable_weight: float = field(
        default=1.0,
        metadata=_help("KTO: weight of good answers. Keep weight x count of good vs bad within 1 to 4/3."),
    )
    undesirable_weight: float = field(
        default=1.0, metadata=_help("KTO: weight of bad answers; raise it when they are the fewer.")
    )
    start_from: str = field(
        default="",
        metadata=_help(
            "A finished run whose adapter this run starts from (and, for DPO, its reference): SFT first, then "
            "DPO, is the usual pipeline. Empty = a fresh adapter."
        ),
    )

    def validate(self) -> list[Problem]:
        p = Problems()
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                p.add(f"preference.{name}", f"preference.{name} must be a positive number (got {value!r}).")
        if self.loss_type not in DPO_LOSSES:
            p.add(
                "preference.loss_type",
                f"preference.loss_type must be one of {', '.join(DPO_LOSSES)} (got {self.loss_type!r}).",
            )
        if not _is_number(self.label_smoothing) or not 0 <= self.label_smoothing < 0.5:
            p.add(
                "preference.label_smoothing",
                f"preference.label_smoothing must be in [0, 0.5) (got {self.label_smoothing!r}); 0.1 for noisy pairs.",
            )
        if not _is_number(self.sft_weight) or self.sft_weight < 0:
            p.add("preference.sft_weight", f"preference.sft_weight must be 0 or positive (got {self.sft_weight!r}).")
        if not _is_number(self.simpo_gamma) or self.simpo_gamma < 0:
            p.add("preference.simpo_gamma", f"preference.simpo_gamma must be 0 or positive (got {self.simpo_gamma!r}).")
        if not isinstance(self.start_from, str):
            p.add(
                "preference.start_from", f"preference.start_from must be a run id or empty (got {self.start_from!r})."
            )
        return p


@dataclass
class DistributionSpec:
    processes: int = field(
        default=1,
        metadata=_help(
            "Training processes, all machines together. 1 = one worker; 2+ = data parallel through "
            "`accelerate launch`: one process per GPU, or DDP over gloo on CPU."
        ),
    )
    strategy: str = field(
        default="ddp",
        metadata=_help(
            "'ddp': every process holds the model, LoRA's small gradients are averaged (the usual choice). "
            "'fsdp' or 'deepspeed-zero3' shard the base weights too, for models one GPU cannot hold; "
            "'deepspeed-zero2' shards optimizer states and gradients."
        ),
    )
    offload: bool = field(
        default=False,
        metadata=_help("DeepSpeed only: keep optimizer states (ZeRO-3: weights too) in CPU RAM. Slower; fits more."),
    )
    devices: str = field(
        default="auto",
        metadata=_help("GPUs for this run: 'auto' (the queue hands out free ones) or CUDA ids like '0,1'."),
    )
    num_machines: int = field(
        default=1, metadata=_help("Machines taking part; each other machine joins with `studio join` (README).")
    )
    machine_rank: int = field(default=0, metadata=_help("This machine's number: 0 runs the studio, 1.. join it."))
    main_address: str = field(
        default="", metadata=_help("Several machines: IP or host name of machine 0, reachable from the others.")
    )
    main_port: int = field(
        default=0, metadata=_help("Port where the processes meet on machine 0; 0 = any free port (one machine).")
    )

    @property
    def launched(self) -> bool:
        """Whether the worker goes through `accelerate launch` (more than one process anywhere)."""
        return (_is_int(self.processes) and self.processes > 1) or (
            _is_int(self.num_machines) and self.num_machines > 1
        )

    @property
    def per_machine(self) -> int:
        return max(1, self.processes // max(1, self.num_machines))

    def device_ids(self) -> list[int] | None:
        """The CUDA ids the user pinned, or None for 'auto'. Raises ValueError on a malformed list."""
        text = str(self.devices).strip().lower()
        if text in ("", "auto"):
            return None
        ids = parse_gpu_ids(text)
        if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(text)
        return ids

    def validate(self) -> list[Problem]:
        p = Problems()
        if not _is_int(self.processes) or not 1 <= self.processes <= 1024:
            p.add(
                "distribution.processes",
                f"distribution.processes must be a whole number from 1 (got {self.processes!r}).",
            )
        if self.strategy not in STRATEGIES:
            p.add(
                "distribution.strategy",
                f"distribution.strategy must be one of {', '.join(STRATEGIES)} (got {self.strategy!r}).",
            )
        if self.offload and not str(self.strategy).startswith("deepspeed"):
            p.add(
                "distribution.offload",
                "distribution.offload needs a DeepSpeed strategy (deepspeed-zero2/3)",
                "change one of them.",
            )
        try:
            ids = self.device_ids()
        except ValueError:
            ids = None
            p.add(
                "distribution.devices",
                f"distribution.devices must be 'auto' or distinct CUDA ids like '0,1' (got {self.devices!r}).",
            )
        if not _is_int(self.num_machines) or self.num_machines < 1:
            p.add(
                "distribution.num_machines",
                f"distribution.num_machines must be at least 1 (got {self.num_machines!r}).",
            )
        elif not _is_int(self.machine_rank) or not 0 <= self.machine_rank < self.num_machines:
            p.add(
                "distribution.machine_rank",
                f"distribution.machine_rank must be from 0 to {self.num_machines - 1} (got {self.machine_rank!r}).",
            )
        if not _is_int(self.main_port) or not 0 <= self.main_port <= 65535:
            p.add(
                "distribution.main_port",
                f"distribution.main_port must be 0 (any free port) or a port number (got {self.main_port!r}).",
            )
        if p:
            return p
        if self.num_machines > 1:
            if not str(self.main_address).strip():
                p.add(
                    "distribution.main_address", "Several machines need distribution.main_address: the IP of machine 0."
                )
            if self.main_port == 0:
                p.add(
                    "distribution.main_port",
                    "Several machines need a fixed distribution.main_port (e.g. 29500), open on machine 0.",
                )
            if self.processes % self.num_machines:
                p.add(
                    "distribution.processes",
                    f"distribution.processes ({self.processes}) must split evenly over {self.num_machines} "
                    "machines: the same number of processes on each.",
                )
        if ids is not None and self.launched and len(ids) != self.per_machine:
            p.add(
                "distribution.devices",
                f"distribution.devices lists {len(ids)} GPU(s) for {self.per_machine} process(es) per machine",
                "list one GPU per process, or use 'auto'.",
            )
        if ids is not None and not self.launched and len(ids) != 1:
            p.add(
                "distribution.devices",
                f"distribution.devices lists {len(ids)} GPUs for a single process",
                f"set distribution.processes to {len(ids)} to train on all of them, or list one.",
            )
        if self.strategy != "ddp" and not self.launched:
            p.add(
                "distribution.strategy",
                f"distribution.strategy '{self.strategy}' splits work across processes",
                "with one process use 'ddp' (no effect), or raise distribution.processes.",
            )
        return p


@dataclass
class RunConfig:
    name: str = field(default="", metadata=_help("A short name for the run; the run id adds a timestamp."))
    stage: str = field(
        default="sft",
        metadata=_help(
            "sft: learn the answers (instruction or chat data). dpo, kto, orpo: learn which answers are better "
            "(pairs, or answers labelled good or bad)."
        ),
    )
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    distribution: DistributionSpec = field(default_factory=DistributionSpec)
    preference: PreferenceSpec = field(default_factory=PreferenceSpec)

    def validate(self) -> list[Problem]:
        problems = [
            *([] if self.stage in STAGES else [Problem("stage", _stage_message(self.stage))]),
            *self.model.validate(),
            *self.lora.validate(),
            *self.quant.validate(),
            *self.data.validate(),
            *self.train.validate(),
            *self.distribution.validate(),
            *self.preference.validate(),
        ]
        problems += _cross_checks(self)
        return problems

    def check(self) -> RunConfig:
        problems = self.validate()
        if problems:
            raise ConfigError(problems)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: Path) -> None:
        atomic_write(path, self.to_yaml())

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RunConfig:
        """Build from a (possibly partial) dict; unknown keys are an error, never silently ignored."""
        return _from_dict(cls, data or {}, "")

    @classmethod
    def from_yaml(cls, text: str) -> RunConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError([Problem("", f"The YAML cannot be parsed: {err}")]) from err
        if data is not None and not isinstance(data, dict):
            raise ConfigError(
                [Problem("", "The YAML must be a mapping of sections (model, lora, quant, data, train, distribution).")]
            )
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([Problem("", f"Config file '{path}' does not exist.")])
        return cls.from_yaml(path.read_text())


def _stage_message(stage: Any) -> str:
    return f"stage must be one of {', '.join(STAGES)} (got {stage!r})."


def _stage_checks(cfg: RunConfig) -> list[Problem]:
    """What a preference stage cannot combine with."""
    p = Problems()
    if cfg.stage not in PREFERENCE_STAGES:
        return p
    if cfg.data.packing:
        p.add(
            "data.packing",
            f"Packing joins samples into one sequence, and stage {cfg.stage} compares whole answers",
            "turn data.packing off.",
        )
    if cfg.preference.loss_type == "simpo" and cfg.stage != "dpo":
        p.add(
            "preference.loss_type",
            f"The simpo loss is a DPO variant; stage {cfg.stage} has its own loss",
            "set it to sigmoid.",
        )
    if cfg.preference.sft_weight and (cfg.stage != "dpo" or cfg.preference.loss_type == "simpo"):
        p.add(
            "preference.sft_weight",
            f"The SFT term (RPO) is added to TRL's DPO losses; {cfg.stage}/{cfg.preference.loss_type} has none",
            "set preference.sft_weight to 0, or use stage dpo with the sigmoid, ipo or hinge loss.",
        )
    if cfg.distribution.launched:
        p.add(
            "distribution.processes",
            f"Stage {cfg.stage} trains in one process here",
            "set distribution.processes to 1 (multi-process preference runs come later).",
        )
    return p


def _cross_checks(cfg: RunConfig) -> list[Problem]:
    """Combinations that are each valid alone but cannot work together."""
    p = Problems()
    p += _stage_checks(cfg)
    if cfg.quant.mode != "none" and cfg.lora.init == "pissa":
        p.add(
            "lora.init",
            "PiSSA init needs full-precision base weights",
            "set lora.init to 'default' or turn quantization off.",
        )
    if cfg.quant.mode != "none" and cfg.lora.bias != "none":
        p.add("lora.bias", "Bias training is not supported on a quantized base", "set lora.bias to 'none'.")
    patience = cfg.train.early_stopping_patience
    if _is_int(patience) and patience > 0 and _is_number(cfg.data.val_size) and cfg.data.val_size <= 0:
        p.add(
            "train.early_stopping_patience",
            "Early stopping watches the eval loss, and there is no validation split",
            "set data.val_size (e.g. 0.1), or train.early_stopping_patience to 0.",
        )
    p += _distribution_checks(cfg)
    if cfg.train.device in ("cpu", "cuda", "mps"):
        p += device_problems(cfg, cfg.train.device)
    return p


def _distribution_checks(cfg: RunConfig) -> list[Problem]:
    d, p = cfg.distribution, Problems()
    if d.strategy in SHARDING and cfg.quant.mode != "none":
        # Sharding needs one storage dtype across all weights; bitsandbytes packs 4-bit weights as uint8 next
        # to bf16 ones. Upstream can do it with bnb_4bit_quant_storage; the studio does not set that up yet.
        p.add(
            "distribution.strategy",
            f"A quantized base (quant.mode {cfg.quant.mode}) cannot be sharded with {d.strategy}",
            "use strategy 'ddp' or 'deepspeed-zero2' (each process keeps its own 4-bit copy), "
            "or turn quantization off.",
        )
    if d.launched and cfg.train.device == "mps":
        p.add(
            "distribution.processes",
            "Apple MPS runs one process",
            "set distribution.processes to 1, or train on CUDA GPUs or CPU.",
        )
    if d.devices not in ("", "auto") and cfg.train.device in ("cpu", "mps"):
        p.add(
            "distribution.devices",
            f"distribution.devices names GPUs but train.device is {cfg.train.device}",
            "set devices to 'auto'.",
        )
    return p


def device_problems(cfg: RunConfig, device: str) -> list[Problem]:
    """Combinations a device refuses. validate() asks when the device is fixed; check_runtime once 'auto'
    has resolved, so the same words reach the user either way."""
    p = Problems()
    if device == "cpu" and cfg.distribution.strategy != "ddp" and cfg.distribution.launched:
        p.add(
            "distribution.strategy",
            f"distribution.strategy '{cfg.distribution.strategy}' needs CUDA GPUs",
            "on CPU use 'ddp' (processes share the cores over gloo).",
        )
    if device == "cpu" and cfg.train.compute_type == "fp16":
        p.add(
            "train.compute_type", "fp16 training needs a GPU (no fp16 loss scaling on CPU)", "use fp32 or bf16 on CPU."
        )
    if device == "mps" and cfg.quant.mode != "none":
        p.add(
            "quant.mode",
            "Quantization (bitsandbytes) has no Apple MPS backend",
            "set quant.mode to 'none', or train.device to 'cpu' (slow) or a CUDA GPU.",
        )
    if device == "cpu" and cfg.quant.mode == "8bit" and cfg.lora.use_dora:
        # bitsandbytes 0.50's CPU int8 matmul loses its scales once DoRA has read the weights (AttributeError).
        p.add(
            "lora.use_dora",
            "DoRA on an 8-bit base fails on CPU",
            "use quant.mode '4bit' or 'none', or turn lora.use_dora off.",
        )
    return p


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _coerce(value: Any, declared: Any) -> Any:
    """YAML and form widgets give '2e-4' or 16.0; turn them into the declared type where that is lossless.
    `declared` is the field's real type (typing.get_type_hints), e.g. float or int | None."""
    if value is None or isinstance(value, bool):
        return value
    kinds = typing.get_args(declared) or (declared,)
    if float in kinds and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if float in kinds and isinstance(value, int):
        return float(value)
    if kinds[0] is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kinds[0] is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def _from_dict(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        where = prefix.rstrip(".")
        raise ConfigError([Problem(where, f"'{where or 'config'}' must be a mapping, got {type(data).__name__}.")])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    known = ", ".join(fields)
    problems = [Problem(f"{prefix}{k}", f"Unknown key '{prefix}{k}' (known keys here: {known}).") for k in unknown]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in fields:
            continue
        f = fields[name]
        sub = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None  # type: ignore[arg-type]
        if sub is not None:
            try:
                kwargs[name] = _from_dict(sub, value or {}, f"{prefix}{name}.")
            except ConfigError as err:
                problems += err.problems
        else:
            kwargs[name] = _coerce(value, typing.get_type_hints(cls)[name])
    if problems:
        raise ConfigError(problems)
    return cls(**kwargs)


def merge_dicts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested sections are merged key by key, other values replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out
