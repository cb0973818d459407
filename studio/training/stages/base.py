"""What a training stage provides. A stage is one way to train an adapter (supervised fine-tuning, and the
preference stages DPO, KTO, ORPO): it builds its rows from the registered datasets, names the arguments and
makes the trainer that runs it, and says which metrics its runs log and which config fields its form shows.

The run loop (studio.training.loop) does everything else the same for every stage: device, model, LoRA,
checkpoints, the coach, saving. A new stage is a new module next to sft.py, added to STAGES.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from studio.core.config import RunConfig
from studio.training.coach import DataFacts
from studio.training.meter import TokenCounter


class StageName(StrEnum):
    SFT = "sft"
    DPO = "dpo"
    KTO = "kto"
    ORPO = "orpo"


@dataclass
class StageData:
    """A stage's rows, ready for its trainer, and what the run reports about them."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    lengths: list[int]  # every kept sample's untruncated length in tokens
    truncated: int
    packed: bool
    facts: DataFacts | None = None  # what the coach reads about the data (truncation, EOS, size)


class Stage(Protocol):
    name: StageName
    metrics: tuple[str, ...]  # the store's metric fields its runs log
    form_fields: tuple[str, ...]  # the config field paths ("section.field") the Train form shows for it

    def build_data(self, config: RunConfig, tokenizer: Any, home: Path) -> StageData:
        """The registered datasets as this stage's train and eval rows."""
        ...

    def describe(self, data: StageData, config: RunConfig) -> str:
        """One line for the run's events: what the data came to."""
        ...

    def arguments(self, config: RunConfig) -> tuple[type, dict[str, Any]]:
        """The TrainingArguments class its trainer takes (TRL's configs subclass it) and the stage's own
        arguments; the loop adds everything every stage shares (batch, lr, schedule, saving, precision)."""
        ...

    def make_trainer(
        self,
        config: RunConfig,
        *,
        model: Any,
        args: Any,
        data: StageData,
        tokenizer: Any,
        counter: TokenCounter,
        callbacks: list,
        optimizers: tuple,
    ) -> Any:
        """The transformers (or TRL) trainer over `data`, adding the trained tokens to `counter`."""
        ...


def config_paths(section: str) -> tuple[str, ...]:
    """'section.field' for every field of one RunConfig section, in declaration order."""
    spec = next(f for f in dataclasses.fields(RunConfig) if f.name == section).default_factory
    return tuple(f"{section}.{f.name}" for f in dataclasses.fields(spec))


# The fields every stage's form shows: the model, the adapter, precision, the optimizer, the run's scale,
# and the data every stage reads the same way. A stage adds its own (SFT: packing, prompt masking...).
COMMON_FORM_FIELDS: tuple[str, ...] = (
    "name",
    "stage",
    *config_paths("model"),
    *config_paths("lora"),
    *config_paths("quant"),
    "data.datasets",
    "data.cutoff_len",
    "data.max_samples",
    "data.val_size",
    *config_paths("train"),
    *config_paths("distribution"),
)
