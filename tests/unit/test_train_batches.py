"""How training batches are built: padding, packing without cross-talk, what the speed meter counts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from studio.training.loop import checkpointing_args, sampling_args
from studio.training.meter import TokenCounter
from studio.training.stages.sft import HELD_OUT, Collator


def test_collator_pads_and_counts_real_tokens_only():
    counter = TokenCounter()
    batch = Collator(0, counter)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert (counter.total, counter.positions) == (4, 6)
    assert counter.padding_share == pytest.approx(2 / 6)


def test_pad_to_cutoff_gives_every_batch_the_same_width():
    counter = TokenCounter()
    batch = Collator(0, counter, pad_to=6)([{"input_ids": [5, 6], "labels": [5, 6]}])
    assert batch["input_ids"].tolist() == [[5, 6, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0]]
    assert (counter.total, counter.positions) == (2, 6)


def test_held_out_rows_are_not_counted_as_training():
    counter = TokenCounter()
    Collator(0, counter)([{"input_ids": [1, 2], "labels": [1, 2], HELD_OUT: True}])
    assert (counter.total, counter.positions, counter.padding_share) == (0, 0, 0.0)


def test_packed_batch_has_positions_and_no_mask():
    row = {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]}
    batch = Collator(0)([row, {**row, "input_ids": [9], "labels": [9], "position_ids": [0]}])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]


def test_packed_samples_do_not_see_each_other(tiny_model_dir):
    """The second sample's logits inside a packed row equal its logits alone: the mask transformers builds
    from the reset position ids keeps attention inside each sample. It does so only without a KV cache,
    as in training (the studio sets use_cache=False)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    a, b = [11, 12, 13, 14, 15, 16], [21, 22, 23, 24]
    packed = Collator(0)([{"input_ids": a + b, "labels": a + b, "position_ids": [*range(len(a)), *range(len(b))]}])
    alone = Collator(0)([{"input_ids": b, "labels": b}])
    with torch.no_grad():
        ids, positions = packed["input_ids"], packed["position_ids"]
        inside = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, len(a) :]
        single = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"], use_cache=False).logits[0]
        # Controls: one running position sequence, or a KV cache, lets b see a.
        leaky = model(input_ids=ids, use_cache=False).logits[0, len(a) :]
        cached = model(input_ids=ids, position_ids=positions, use_cache=True).logits[0, len(a) :]
    assert torch.allclose(inside, single, atol=1e-5)
    assert not torch.allclose(leaky, single, atol=1e-3)
    assert not torch.allclose(cached, single, atol=1e-3)


def test_trainer_arguments_under_this_transformers_names(tmp_path):
    ckpt = checkpointing_args(True, TrainingArguments)
    grouped = sampling_args(True, TrainingArguments)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **ckpt, **grouped)
    assert args.gradient_checkpointing and args.train_sampling_strategy == "group_by_length"
    assert sampling_args(False, TrainingArguments) == {}
    assert checkpointing_args(False, TrainingArguments)[next(iter(ckpt))] is False
