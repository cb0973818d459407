"""The preference stages in the run config and the submit check (issue 15): every wrong combination is
refused with the field it is about, and nothing is created."""

from __future__ import annotations

import pytest

from studio.core.config import ConfigError, RunConfig
from studio.core.store import RunStatus, Store
from studio.core.workspace import db_path
from studio.runs.preflight import dataset_problems, same_model, start_problems
from studio.runs.queue import JobManager
from tests.builders import small_run_config


def paths(config: RunConfig) -> list[str]:
    return [p.path for p in config.validate()]


def test_stage_and_preference_settings_are_validated_by_field():
    config = RunConfig.from_dict({"stage": "ppo", "data": {"datasets": ["x"]}})
    assert paths(config) == ["stage"]
    config = RunConfig.from_dict(
        {"stage": "dpo", "data": {"datasets": ["x"], "packing": True},
         "preference": {"beta": 0, "loss_type": "dpop", "label_smoothing": 0.5, "undesirable_weight": -1}}
    )  # fmt: skip
    assert paths(config) == [
        "preference.beta",
        "preference.undesirable_weight",
        "preference.loss_type",
        "preference.label_smoothing",
        "data.packing",
    ]
    kto = RunConfig.from_dict({"stage": "kto", "data": {"datasets": ["x"]}, "preference": {"loss_type": "simpo"}})
    assert paths(kto) == ["preference.loss_type"]
    assert "simpo loss is a DPO variant" in str(kto.validate()[0])
    rpo = {"stage": "kto", "data": {"datasets": ["x"]}, "preference": {"sft_weight": 0.5}}
    assert paths(RunConfig.from_dict(rpo)) == ["preference.sft_weight"]  # an SFT term only for DPO
    rpo.update(stage="dpo", preference={"sft_weight": -1})
    assert paths(RunConfig.from_dict(rpo)) == ["preference.sft_weight"]
    rpo.update(preference={"sft_weight": 1.0})
    assert paths(RunConfig.from_dict(rpo)) == []


def test_an_old_config_without_a_stage_is_sft_and_a_new_one_round_trips():
    old = RunConfig.from_yaml("model: {source: bundled}\ndata: {datasets: [studio-facts]}\n")
    assert old.stage == "sft" and old.preference.beta == 0.1
    new = RunConfig.from_dict({"stage": "dpo", "preference": {"beta": 0.05, "start_from": "sft-1"}})
    again = RunConfig.from_yaml(new.to_yaml())
    assert (again.stage, again.preference.beta, again.preference.start_from) == ("dpo", 0.05, "sft-1")


@pytest.mark.parametrize(
    ("stage", "dataset", "says"),
    [
        ("sft", "studio-prefs", "supervised fine-tuning cannot learn from. Set stage to dpo"),
        ("sft", "studio-kto", "Set stage to kto"),
        ("dpo", "studio-facts", "stage dpo trains on pairs of a chosen and a rejected answer"),
        ("orpo", "studio-kto", "stage orpo trains on pairs"),
        ("kto", "studio-chats", "stage kto trains on answers labelled good or bad"),
    ],
)
def test_a_dataset_the_stage_cannot_train_on_is_refused(home, stage, dataset, says):
    config = RunConfig.from_dict({"stage": stage, "data": {"datasets": [dataset]}})
    (problem,) = dataset_problems(home, config)
    assert problem.path == "data.datasets" and says in problem.message and dataset in problem.message


@pytest.mark.parametrize(("stage", "dataset"), [("dpo", "studio-prefs"), ("orpo", "studio-prefs"),
                                                ("kto", "studio-kto"), ("kto", "studio-prefs"),
                                                ("sft", "studio-facts")])  # fmt: skip
def test_the_right_data_passes(home, stage, dataset):
    assert dataset_problems(home, RunConfig.from_dict({"stage": stage, "data": {"datasets": [dataset]}})) == []


def test_start_from_must_be_a_completed_run_on_the_same_base(home, tmp_path, tiny_model_dir):
    store = Store(db_path(home))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"0")
    store.create_run("sft-1", "sft", {"model": {"source": str(tiny_model_dir)}}, str(tmp_path / "r1"))
    store.transition("sft-1", RunStatus.RUNNING)
    config = small_run_config(tiny_model_dir)
    config.stage, config.preference.start_from = "dpo", "sft-1"

    (unfinished,) = start_problems(home, config)
    assert unfinished.path == "preference.start_from" and "is running" in unfinished.message
    store.transition("sft-1", RunStatus.COMPLETED, adapter_dir=str(adapter))
    assert start_problems(home, config) == []
    config.model.source = "bundled"
    (other,) = start_problems(home, config)
    assert "an adapter only fits the base it was trained on" in other.message
    config.preference.start_from = "nope"
    (missing,) = start_problems(home, config)
    assert "There is no run 'nope'" in missing.message


def test_submit_refuses_the_wrong_data_and_leaves_nothing(home, tiny_model_dir):
    jobs = JobManager(home)
    config = small_run_config(tiny_model_dir, data={"datasets": ["studio-facts"]})
    config.stage = "dpo"
    with pytest.raises(ConfigError) as err:
        jobs.submit(config, start=False)
    assert [p.path for p in err.value.problems] == ["data.datasets"]
    assert list((home / "runs").iterdir()) == [] and jobs.store.list_runs() == []


def test_same_model():
    assert same_model("", "bundled") and same_model(" bundled ", None)
    assert not same_model("bundled", "org/other-model")
