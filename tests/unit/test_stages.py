"""The training-stage seam: the registry, and supervised fine-tuning behind the Stage protocol (its form
fields are config paths, its metrics are the store's, its data and collator are what the loop trains on)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
from transformers import TrainerControl

from studio.core.config import STAGES as CONFIG_STAGES
from studio.core.config import RunConfig
from studio.core.store import METRIC_FIELDS
from studio.training.callbacks import StudioCallback
from studio.training.meter import TokenCounter
from studio.training.stages import DEFAULT_STAGE, STAGES, StageData, StageName, get_stage
from studio.training.stages.sft import HELD_OUT, IGNORE, Collator, SupervisedStage
from tests.builders import small_run_config


def config_leaves() -> list[str]:
    """Every 'section.field' of RunConfig ('name' has no section)."""
    out = []
    for top in dataclasses.fields(RunConfig):
        spec = top.default_factory if dataclasses.is_dataclass(top.default_factory) else None
        out += [top.name] if spec is None else [f"{top.name}.{f.name}" for f in dataclasses.fields(spec)]
    return out


def test_every_stage_is_registered_under_its_name_and_sft_is_the_default():
    assert DEFAULT_STAGE == StageName.SFT == "sft" == RunConfig().stage
    assert all(stage.name == name for name, stage in STAGES.items())
    assert get_stage() is get_stage("sft") is STAGES[StageName.SFT]
    assert isinstance(get_stage(), SupervisedStage)
    assert [s.value for s in STAGES] == list(CONFIG_STAGES)  # the config accepts exactly the registered stages
    with pytest.raises(ValueError, match=r"Unknown training stage 'ppo'\. Known: sft, dpo, kto, orpo\."):
        get_stage("ppo")


@pytest.mark.parametrize("name", list(StageName))
def test_form_fields_are_config_paths(name):
    fields = get_stage(name).form_fields
    assert len(fields) == len(set(fields))
    config = RunConfig()
    for path in fields:
        spec = config
        for part in path.split("."):
            assert hasattr(spec, part), f"{path} is not a config field"
            spec = getattr(spec, part)


def test_the_stages_together_cover_the_whole_form_and_each_shows_only_its_own_section():
    every = set().union(*(stage.form_fields for stage in STAGES.values()))
    assert sorted(every) == sorted(config_leaves())
    sft, dpo = get_stage("sft").form_fields, get_stage("dpo").form_fields
    assert "data.packing" in sft and "data.packing" not in dpo
    assert "preference.beta" in dpo and not any(f.startswith("preference.") for f in sft)


def test_sft_metrics_are_store_fields_and_the_callback_logs_only_those():
    stage = get_stage(StageName.SFT)
    assert set(stage.metrics) <= set(METRIC_FIELDS)

    logged: dict[str, float | None] = {}
    sink = SimpleNamespace(log=lambda step, **values: logged.update(values), event=lambda *a: None)
    callback = StudioCallback(sink, lambda: False, TokenCounter(), "cpu", RunConfig())
    state = SimpleNamespace(log_history=[], global_step=1, epoch=0.5, max_steps=10)
    for logs in ({"loss": 2.0, "learning_rate": 1e-4, "grad_norm": 0.5}, {"eval_loss": 1.9}):
        state.log_history.append({**logs, "step": 1})
        callback.on_log(None, state, TrainerControl(), logs=logs)
    assert set(logged) == set(stage.metrics)


def test_sft_collator_pads_with_the_tokenizers_pad_id_and_counts_tokens(tokenizer):
    stage = get_stage(StageName.SFT)
    counter = TokenCounter()
    config = RunConfig()
    collate = stage.collator(config, tokenizer, counter)
    assert isinstance(collate, Collator) and collate.pad_to is None
    pad = tokenizer.pad_token_id
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert (counter.total, counter.positions) == (4, 6)

    config.data.pad_to_cutoff, config.data.cutoff_len = True, 5
    batch = stage.collator(config, tokenizer, TokenCounter())([{"input_ids": [5, 6], "labels": [5, 6]}])
    assert batch["input_ids"].tolist() == [[5, 6, pad, pad, pad]]


def test_sft_builds_its_rows_from_a_registered_dataset(home, tokenizer, tiny_model_dir):
    stage = get_stage(StageName.SFT)
    config = small_run_config(tiny_model_dir, data={"val_size": 0.1})
    data = stage.build_data(config, tokenizer, home)
    assert isinstance(data, StageData) and data.train and data.eval and not data.packed
    assert all(row.get(HELD_OUT) for row in data.eval) and not any(HELD_OUT in row for row in data.train)
    assert all(len(row["input_ids"]) == len(row["labels"]) <= 64 for row in data.train)
    assert data.facts is not None and data.facts.samples == len(data.train) + len(data.eval)
    line = stage.describe(data, config)
    assert line.startswith(f"Data: {len(data.train)} train samples, {len(data.eval)} eval; tokens per sample")

    config.data.packing = True
    packed = stage.build_data(config, tokenizer, home)
    assert packed.packed and all("position_ids" in row for row in packed.train)
    assert "train blocks (packed)" in stage.describe(packed, config)


def test_sft_is_run_by_transformers_trainer_and_the_preference_stages_by_trl(tokenizer, tiny_model_dir):
    from transformers import TrainingArguments
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    assert get_stage("sft").arguments(RunConfig()) == (TrainingArguments, {})
    dpo = small_run_config(tiny_model_dir)
    dpo.stage, dpo.preference.beta = "dpo", 0.2
    assert get_stage("dpo").arguments(dpo) == (
        DPOConfig,
        {"loss_type": ["sigmoid"], "beta": 0.2, "label_smoothing": 0.0, "max_length": 64},
    )
    dpo.preference.label_smoothing = 0.1  # TRL's sigmoid loss ignores it; its robust loss is sigmoid with it
    assert get_stage("dpo").arguments(dpo)[1]["loss_type"] == ["robust"]
    dpo.preference.sft_weight = 0.5  # RPO: TRL's sft loss on the chosen answers, weighted, beside the DPO loss
    own = get_stage("dpo").arguments(dpo)[1]
    assert (own["loss_type"], own["loss_weights"]) == (["robust", "sft"], [1.0, 0.5])
    dpo.preference.sft_weight = 0.0
    dpo.preference.loss_type = "simpo"
    cls, own = get_stage("dpo").arguments(dpo)
    assert cls is CPOConfig and own["loss_type"] == "simpo" and own["cpo_alpha"] == 0.0
    assert get_stage("kto").arguments(dpo)[0] is KTOConfig and get_stage("orpo").arguments(dpo)[0] is ORPOConfig
    assert get_stage("dpo").trainer_class() is DPOTrainer
    assert get_stage("kto").trainer_class() is KTOTrainer and get_stage("orpo").trainer_class() is ORPOTrainer


def test_preference_metrics_are_store_fields_and_the_callback_maps_trls_names():
    for stage in STAGES.values():
        assert set(stage.metrics) <= set(METRIC_FIELDS), stage.name
    logged: dict[str, float | None] = {}
    sink = SimpleNamespace(log=lambda step, **values: logged.update(values), event=lambda *a: None)
    callback = StudioCallback(sink, lambda: False, TokenCounter(), "cpu", RunConfig())
    state = SimpleNamespace(log_history=[], global_step=1, epoch=0.5, max_steps=10)
    logs = {"loss": 0.69, "rewards/chosen": 0.1, "rewards/rejected": -0.2, "rewards/margins": 0.3,
            "rewards/accuracies": 0.75, "logps/chosen": -40.0, "logps/rejected": -50.0, "kl": 0.01}  # fmt: skip
    state.log_history.append({**logs, "step": 1})
    callback.on_log(None, state, TrainerControl(), logs=logs)
    assert (logged["reward_margin"], logged["reward_accuracy"], logged["kl"]) == (0.3, 0.75, 0.01)
    callback.on_log(None, state, TrainerControl(), logs={"eval_loss": 0.6, "eval_rewards/accuracies": 0.9})
    assert logged["eval_reward_accuracy"] == 0.9


def test_preference_stages_build_trl_rows_from_the_bundled_samples(home, tokenizer, tiny_model_dir):
    config = small_run_config(tiny_model_dir, data={"datasets": ["studio-prefs"], "cutoff_len": 128, "val_size": 0.2})
    config.stage = "dpo"
    data = get_stage("dpo").build_data(config, tokenizer, home)
    assert (len(data.train), len(data.eval)) == (58, 14) and not data.packed
    row = data.train[0]
    assert set(row) == {"prompt", "chosen", "rejected"} and row["chosen"][0]["role"] == "assistant"
    assert max(data.lengths) <= 128 and data.truncated == 0
    assert "58 train pairs, 14 eval" in get_stage("dpo").describe(data, config)

    config.stage = "kto"  # pairs are unpaired for KTO: each gives a good and a bad answer
    unpaired = get_stage("kto").build_data(config, tokenizer, home)
    assert len(unpaired.train) + len(unpaired.eval) == 144
    assert {r["label"] for r in unpaired.train} == {True, False}
    prompts = [{json.dumps(r["prompt"]) for r in rows} for rows in (unpaired.train, unpaired.eval)]
    assert not prompts[0] & prompts[1]  # a pair's two answers stay on one side of the split
    config.data.datasets = ["studio-kto"]
    assert len(get_stage("kto").build_data(config, tokenizer, home).train) == 58


def test_a_preference_trainer_counts_train_tokens_and_not_eval_ones(home, tokenizer, tiny_model_dir, tmp_path):
    """The run's tokens/s: the train loader collates through the counter, the eval loader does not."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from studio.training.loop import _training_args

    config = small_run_config(tiny_model_dir, data={"datasets": ["studio-prefs"], "cutoff_len": 128, "val_size": 0.2})
    config.stage = "dpo"
    stage = get_stage("dpo")
    data = stage.build_data(config, tokenizer, home)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    counter = TokenCounter()
    args = _training_args(config, tmp_path, "cpu", True, stage)
    trainer = stage.make_trainer(config, model=model, args=args, data=data, tokenizer=tokenizer, counter=counter,
                                 callbacks=[], optimizers=(None, None))  # fmt: skip
    next(iter(trainer.get_eval_dataloader()))
    assert counter.total == 0
    seen = sum(int(batch["attention_mask"].sum()) for batch in trainer.get_train_dataloader())
    assert counter.total == seen > 0 and counter.samples == len(data.train)  # every train row, once
