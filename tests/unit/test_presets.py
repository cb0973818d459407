import pytest

from studio.core.config import ConfigError, RunConfig
from studio.core.presets import list_presets, load_preset, preset_names, save_preset


def test_required_presets_exist():
    assert {"quick-demo", "lora-balanced", "qlora-consumer-gpu"} <= set(preset_names())


@pytest.mark.parametrize("preset", list_presets(), ids=lambda p: p.name)
def test_every_preset_loads_and_validates(preset):
    cfg = preset.to_config()
    if not cfg.data.datasets:  # general presets leave the dataset to the user
        cfg.data.datasets = ["studio-facts"]
    assert cfg.validate() == []
    assert preset.description, "every preset explains itself"


def test_presets_carry_their_promises():
    balanced = load_preset("lora-balanced")
    assert (balanced.lora.r, balanced.lora.alpha, balanced.lora.target_modules) == (16, 32, "all-linear")
    qlora = load_preset("qlora-consumer-gpu")
    assert (qlora.quant.mode, qlora.quant.quant_type, qlora.quant.double_quant) == ("4bit", "nf4", True)
    assert qlora.train.optimizer == "paged_adamw_8bit" and qlora.quant.compute_dtype == "bf16"
    demo = load_preset("quick-demo")
    assert demo.model.source == "bundled" and demo.data.datasets == ["studio-facts"]


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError) as err:
        load_preset("nope")
    assert "quick-demo" in str(err.value)


def test_preset_with_unknown_key_is_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError) as err:
        load_preset("bad", directory=tmp_path)
    assert "lora.rank" in str(err.value)


def test_save_then_load_gives_the_same_config(tmp_path):
    cfg = RunConfig()
    cfg.lora.r = 32
    cfg.data.datasets = ["x"]
    path = save_preset(cfg, "mine", "my preset", directory=tmp_path)
    assert "r: 32" in path.read_text() and "learning_rate" not in path.read_text()
    assert load_preset("mine", directory=tmp_path) == cfg


def test_user_presets_go_to_the_workspace_and_are_listed(home):
    from studio.core.presets import user_presets_dir

    cfg = RunConfig()
    cfg.lora.r = 8
    path = save_preset(cfg, "my-small-rank", "rank 8")
    assert path.parent == user_presets_dir() and str(path).startswith(str(home))
    assert "my-small-rank" in preset_names() and "quick-demo" in preset_names()
    assert load_preset("my-small-rank").lora.r == 8
    with pytest.raises(ConfigError, match="built-in"):
        save_preset(cfg, "quick-demo")
