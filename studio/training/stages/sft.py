"""Supervised fine-tuning: each row's prompt and answer as one sequence, the loss on the answer tokens
(and on the prompt with data.train_on_prompt), optionally packed into cutoff_len blocks; transformers'
Trainer runs it with the collator here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.core.config import RunConfig
from studio.data.split import split_indices
from studio.training.coach import data_facts
from studio.training.errors import TrainingError
from studio.training.meter import TokenCounter
from studio.training.stages.base import COMMON_FORM_FIELDS, StageData, StageName

HELD_OUT = "held_out"  # marks eval rows for the collator
IGNORE = -100


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


def split_data(config: RunConfig, tokenizer, home: Path) -> SplitData:
    """Registered datasets -> tokenized, masked samples, split into train and eval like training does."""
    from studio.data import DatasetRegistry, build_sample

    registry = DatasetRegistry(home)
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


def prepare_data(config: RunConfig, tokenizer, home: Path) -> StageData:
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
    return StageData(
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


class SupervisedStage:
    """Supervised fine-tuning behind the Stage protocol."""

    name = StageName.SFT
    metrics = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "memory_mb", "epoch")
    form_fields = (
        *COMMON_FORM_FIELDS,
        "data.packing",
        "data.group_by_length",
        "data.pad_to_cutoff",
        "data.train_on_prompt",
    )

    def build_data(self, config: RunConfig, tokenizer: Any, home: Path) -> StageData:
        return prepare_data(config, tokenizer, home)

    def collator(self, config: RunConfig, tokenizer: Any, counter: TokenCounter) -> Collator:
        pad_to = config.data.cutoff_len if config.data.pad_to_cutoff else None
        return Collator(tokenizer.pad_token_id, counter, pad_to=pad_to)

    def describe(self, data: StageData, config: RunConfig) -> str:
        lengths = sorted(data.lengths)
        return (
            f"Data: {len(data.train)} train {'blocks (packed)' if data.packed else 'samples'}, {len(data.eval)} "
            f"eval; tokens per sample median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
            f"{data.truncated} of {len(lengths)} cut at {config.data.cutoff_len}"
        )

    def arguments(self, config: RunConfig) -> tuple[type, dict[str, Any]]:
        from transformers import TrainingArguments

        return TrainingArguments, {}

    def make_trainer(self, config: RunConfig, *, model: Any, args: Any, data: StageData, tokenizer: Any,
                     counter: TokenCounter, callbacks: list, optimizers: tuple) -> Any:  # fmt: skip
        from transformers import Trainer

        return Trainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval or None,
            data_collator=self.collator(config, tokenizer, counter),
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
        )
