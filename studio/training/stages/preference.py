"""Preference training: DPO (with its sigmoid, IPO, hinge and reference-free SimPO losses), KTO and ORPO,
each run by TRL's own trainer on the studio's LoRA model.

The reference is never a second copy of the model: TRL computes it with the same weights, through a frozen
copy of the starting adapter (a fresh adapter is zero, so that is the base; a DPO run started from an SFT
run's adapter compares against that SFT model, as the usual SFT -> DPO pipeline wants).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.core.config import RunConfig
from studio.data.split import split_indices
from studio.training.errors import TrainingError
from studio.training.meter import TokenCounter
from studio.training.stages.base import COMMON_FORM_FIELDS, StageData, StageName, config_paths

# The batch's masks of the sequences trained on (TRL's collators name them so); a KTO KL pass is not counted.
_TRAINED_MASKS = ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")
_COMMON_METRICS = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "memory_mb", "epoch")
PREFERENCE_FORM_FIELDS = (*COMMON_FORM_FIELDS, *config_paths("preference"))


@dataclass
class CountingCollator:
    """The trainer's own collator, counting the real tokens of the batches it makes for the run's speed.
    Only the train loader uses it (count_training_tokens): eval batches are not counted."""

    inner: Callable[[list], dict]
    counter: TokenCounter

    def __call__(self, features: list) -> dict:
        batch = self.inner(features)
        masks = [batch[k] for k in _TRAINED_MASKS if k in batch]
        self.counter.total += int(sum(int(m.sum()) for m in masks))
        self.counter.positions += int(sum(m.numel() for m in masks))
        self.counter.samples += len(features)
        return batch


def count_training_tokens(trainer: Any, counter: TokenCounter) -> None:
    """The train loader collates through a CountingCollator, the eval loaders through the trainer's own
    (a loader keeps the collator it was built with; the train one is built once, at train())."""
    inner = trainer.data_collator
    counting = CountingCollator(inner, counter)
    make_eval_loader = trainer.get_eval_dataloader

    def eval_loader(*args: Any, **kwargs: Any) -> Any:
        trainer.data_collator = inner
        try:
            return make_eval_loader(*args, **kwargs)
        finally:
            trainer.data_collator = counting

    trainer.data_collator = counting
    trainer.get_eval_dataloader = eval_loader


def preference_rows(items: Sequence[Any]) -> list[dict[str, Any]]:
    """Pairs or labelled answers as TRL's conversational rows (its trainers apply the chat template)."""
    return [item.to_trl() for item in items]


def load_items(config: RunConfig, home: Path, kind: str) -> list[Any]:
    """The run's datasets as pairs ('preference') or labelled answers ('kto'; pairs count too, see
    `unpaired`). The submit check refuses other data first."""
    from studio.data import DataError, DatasetRegistry

    registry = DatasetRegistry(home)
    items: list[Any] = []
    for name in config.data.datasets:
        entry = registry.get(name)
        if entry.format != kind and not (kind == "kto" and entry.format == "preference"):
            raise DataError(f"Dataset '{name}' is {entry.format} data; stage {config.stage} cannot train on it.")
        loaded = registry.load_preference(name)
        items += loaded[: config.data.max_samples] if config.data.max_samples else loaded
    return items


def split_items(config: RunConfig, home: Path, kind: str) -> tuple[list[Any], list[Any]]:
    """(train, held-out) items, split as every preference run and its evaluation split them: on the
    items themselves, before KTO unpairs pairs, so both answers of a pair stay on one side."""
    items = load_items(config, home, kind)
    eval_idx, train_idx = split_indices(len(items), config.data.val_size, config.train.seed)
    return [items[i] for i in train_idx], [items[i] for i in eval_idx]


def unpaired(items: Sequence[Any]) -> list[Any]:
    """KTO's labelled answers: a pair gives its chosen answer labelled good and its rejected one bad."""
    from studio.data.preference import LabeledCompletion, PreferencePair

    out: list[Any] = []
    for item in items:
        if isinstance(item, PreferencePair):
            out += [
                LabeledCompletion(item.prompt, item.chosen, True),
                LabeledCompletion(item.prompt, item.rejected, False),
            ]
        else:
            out.append(item)
    return out


def token_lengths(tokenizer: Any, rows: list[dict[str, Any]]) -> list[int]:
    """Each row's longest side in tokens (prompt + answer), as its trainer will see it."""
    lengths = []
    for row in rows:
        sides = [row["chosen"], row["rejected"]] if "chosen" in row else [row["completion"]]
        texts = [tokenizer.apply_chat_template(row["prompt"] + side, tokenize=False) for side in sides]
        lengths.append(max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]))
    return lengths


class PreferenceStage:
    """What DPO, KTO and ORPO share: data from preference datasets, TRL's trainer over the LoRA model."""

    name: StageName
    data_kind = "preference"  # the dataset format this stage reads
    metrics = (*_COMMON_METRICS, "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy",
               "logps_chosen", "logps_rejected", "eval_reward_accuracy", "eval_reward_margin")  # fmt: skip
    form_fields = PREFERENCE_FORM_FIELDS

    def build_data(self, config: RunConfig, tokenizer: Any, home: Path) -> StageData:
        train_items, eval_items = split_items(config, home, self.data_kind)
        if not train_items and not eval_items:
            raise TrainingError(f"The datasets of this {config.stage} run hold no usable rows.")
        train = preference_rows(self.rows_of(train_items))
        held_out = preference_rows(self.rows_of(eval_items))
        lengths = token_lengths(tokenizer, [*train, *held_out])
        return StageData(
            train=train,
            eval=held_out,
            lengths=lengths,
            truncated=sum(1 for n in lengths if n > config.data.cutoff_len),
            packed=False,
        )

    def describe(self, data: StageData, config: RunConfig) -> str:
        lengths = sorted(data.lengths)
        what = "pairs" if self.data_kind == "preference" else "labelled answers"
        return (
            f"Data: {len(data.train)} train {what}, {len(data.eval)} eval; tokens per row (prompt + longer answer) "
            f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}; {data.truncated} of {len(lengths)} over "
            f"{config.data.cutoff_len}, cut"
        )

    def rows_of(self, items: list[Any]) -> list[Any]:
        """The items this stage trains on (KTO unpairs pairs)."""
        return items

    def arguments(self, config: RunConfig) -> tuple[type, dict[str, Any]]:
        raise NotImplementedError

    def trainer_class(self) -> type:
        raise NotImplementedError

    def make_trainer(self, config: RunConfig, *, model: Any, args: Any, data: StageData, tokenizer: Any,
                     counter: TokenCounter, callbacks: list, optimizers: tuple) -> Any:  # fmt: skip
        from datasets import Dataset

        trainer = self.trainer_class()(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(data.train),
            eval_dataset=Dataset.from_list(data.eval) if data.eval else None,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        count_training_tokens(trainer, counter)
        return trainer


def _lengths(config: RunConfig) -> dict[str, Any]:
    return {"max_length": config.data.cutoff_len}


class DPOStage(PreferenceStage):
    """Direct preference optimisation on pairs; loss_type 'simpo' runs TRL's CPO trainer with the
    reference-free SimPO loss instead."""

    name = StageName.DPO

    def arguments(self, config: RunConfig) -> tuple[type, dict[str, Any]]:
        p = config.preference
        if p.loss_type == "simpo":
            from trl.experimental.cpo import CPOConfig

            return CPOConfig, {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": p.simpo_gamma,
                               "beta": p.beta, "label_smoothing": p.label_smoothing, **_lengths(config)}  # fmt: skip
        from trl import DPOConfig

        # TRL's sigmoid loss ignores label smoothing; its 'robust' loss is the sigmoid one with it (robust DPO).
        loss = "robust" if p.label_smoothing and p.loss_type == "sigmoid" else p.loss_type
        # RPO: TRL's 'sft' loss (the chosen answers' NLL) added with its own weight.
        rpo = {"loss_type": [loss, "sft"], "loss_weights": [1.0, p.sft_weight]} if p.sft_weight else {}
        return DPOConfig, {
            "loss_type": [loss],
            **rpo,
            "beta": p.beta,
            "label_smoothing": p.label_smoothing,
            **_lengths(config),
        }

    def trainer_class(self) -> type:
        from trl import DPOTrainer

        return DPOTrainer

    def make_trainer(self, config: RunConfig, **kwargs: Any) -> Any:
        if config.preference.loss_type == "simpo":
            return _SimPO().make_trainer(config, **kwargs)
        return super().make_trainer(config, **kwargs)


class _SimPO(PreferenceStage):
    def trainer_class(self) -> type:
        from trl.experimental.cpo import CPOTrainer

        return CPOTrainer


class KTOStage(PreferenceStage):
    """Kahneman-Tversky optimisation on answers labelled good or bad (no pairs needed)."""

    name = StageName.KTO
    data_kind = "kto"

    def rows_of(self, items: list[Any]) -> list[Any]:
        return unpaired(items)

    metrics = (*_COMMON_METRICS, "reward_chosen", "reward_rejected", "reward_margin", "kl",
               "logps_chosen", "logps_rejected")  # fmt: skip

    def arguments(self, config: RunConfig) -> tuple[type, dict[str, Any]]:
        from trl import KTOConfig

        p = config.preference
        return KTOConfig, {"beta": p.beta, "desirable_weight": p.desirable_weight,
                           "undesirable_weight": p.undesirable_weight, **_lengths(config)}  # fmt: skip

    def trainer_class(self) -> type:
        from trl import KTOTrainer

        return KTOTrainer


class ORPOStage(PreferenceStage):
    """Odds-ratio preference optimisation: SFT on the chosen answer plus an odds-ratio term, no reference."""

    name = StageName.ORPO

    def arguments(self, config: RunConfig) -> tuple[type, dict[str, Any]]:
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig, {"beta": config.preference.beta, **_lengths(config)}

    def trainer_class(self) -> type:
        from trl.experimental.orpo import ORPOTrainer

        return ORPOTrainer
