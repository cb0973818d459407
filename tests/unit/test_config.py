import dataclasses
import json

import pytest

from studio.core.config import ConfigError, LoraSpec, RunConfig, merge_dicts
from studio.core.problems import Problem, Severity, as_problem


def good() -> RunConfig:
    cfg = RunConfig()
    cfg.data.datasets = ["studio-facts"]
    return cfg


def test_defaults_with_a_dataset_are_valid():
    assert good().validate() == []


def test_defaults_follow_field_notes():
    cfg = RunConfig()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32, "all-linear")
    assert cfg.train.learning_rate == 2e-4 and cfg.train.lr_scheduler == "cosine"


def test_every_problem_is_reported_at_once():
    cfg = RunConfig.from_dict(
        {
            "lora": {"r": 0, "alpha": "abc", "dropout": 1.5},
            "train": {"learning_rate": -1.0, "batch_size": 0, "optimizer": "adamw_9bit"},
            "data": {"datasets": [], "val_size": 1.0},
        }
    )
    problems = cfg.validate()
    paths = {p.path for p in problems}
    for path in (
        "lora.r",
        "lora.alpha",
        "lora.dropout",
        "train.learning_rate",
        "train.batch_size",
        "train.optimizer",
        "data.datasets",
        "data.val_size",
    ):
        assert path in paths, path
    assert len(problems) == 8


def test_check_raises_with_all_problems():
    cfg = RunConfig()
    cfg.lora.r = 0
    with pytest.raises(ConfigError) as err:
        cfg.check()
    assert [p.path for p in err.value.problems] == ["lora.r", "data.datasets"]


def test_a_problem_reads_as_one_sentence_and_names_its_field():
    problem = Problem("lora.bias", "Bias training is not supported on a quantized base", "set lora.bias to 'none'.")
    assert str(problem) == "Bias training is not supported on a quantized base: set lora.bias to 'none'."
    assert f"- {problem}" == f"- {problem!s}" and str(Problem("", "No fix here.")) == "No fix here."
    assert as_problem("A preset's sentence.") == Problem("", "A preset's sentence.") and as_problem(problem) is problem
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.path = "lora.r"  # type: ignore[misc]


def test_config_error_keeps_its_message_and_holds_problems():
    err = ConfigError([Problem("lora.r", "lora.r is bad", "try 8."), "A bare sentence."])
    assert str(err) == "Invalid run config:\n- lora.r is bad: try 8.\n- A bare sentence."
    assert [p.path for p in err.problems] == ["lora.r", ""]


def test_severity_values_are_the_words_written_out():
    assert [str(s) for s in Severity] == ["critical", "error", "warning", "info"]
    assert Severity.WARNING == "warning" and json.dumps({"s": Severity.INFO}) == '{"s": "info"}'


def test_yaml_round_trip_is_exact():
    cfg = good()
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    cfg.quant.mode = "4bit"
    cfg.train.max_steps = 7
    cfg.lora.loraplus_lr_ratio = 16.0
    again = RunConfig.from_yaml(cfg.to_yaml())
    assert again == cfg


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"lora": {"rank": 8}, "trian": {}})
    assert sorted(p.path for p in err.value.problems) == ["lora.rank", "trian"]
    text = str(err.value)
    assert "lora.rank" in text and "trian" in text


def test_strings_from_yaml_are_coerced_where_lossless():
    cfg = RunConfig.from_dict({"train": {"learning_rate": "2e-4", "batch_size": 4.0}, "lora": {"alpha": 16}})
    assert cfg.train.learning_rate == 2e-4 and isinstance(cfg.train.batch_size, int)
    assert isinstance(cfg.lora.alpha, float)


def test_fp16_on_cpu_is_refused():
    cfg = good()
    cfg.train.device = "cpu"
    cfg.train.compute_type = "fp16"
    assert [p.path for p in cfg.validate()] == ["train.compute_type"]


def test_quantized_base_refuses_pissa_and_bias():
    cfg = good()
    cfg.quant.mode = "4bit"
    cfg.lora.init = "pissa"
    cfg.lora.bias = "all"
    problems = cfg.validate()
    assert [p.path for p in problems] == ["lora.init", "lora.bias"]
    assert "PiSSA" in str(problems[0]) and "Bias" in str(problems[1])


def test_target_list_parses_comma_strings():
    assert LoraSpec(target_modules="q_proj, v_proj").target_list() == ["q_proj", "v_proj"]


def test_merge_dicts_is_deep():
    assert merge_dicts({"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"y": 3}}) == {"a": {"x": 1, "y": 3}, "b": 1}
