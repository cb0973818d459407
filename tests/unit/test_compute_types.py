"""Compute types, devices and optimizers: what each device refuses (in validate() when the device is fixed,
in check_runtime once 'auto' has resolved), the explained optimizer fallbacks, and impossible combinations."""

from __future__ import annotations

import pytest
import torch

from studio.core.config import BNB_OPTIMIZERS, OPTIMIZERS, RunConfig
from studio.model.loading import ModelError, detect_device
from studio.training.loop import TrainingError, _training_args, check_runtime, resolve_optimizer
from studio.training.stages import get_stage

NO_CUDA = not torch.cuda.is_available()
NO_MPS = not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
CPU_ONLY = NO_CUDA and NO_MPS


def config(**sections) -> RunConfig:
    cfg = RunConfig(name="t")
    cfg.data.datasets = ["studio-facts"]
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def test_fp16_on_a_fixed_cpu_is_refused_by_validate():
    problems = config(train={"device": "cpu", "compute_type": "fp16"}).validate()
    assert [p.path for p in problems] == ["train.compute_type"]
    assert str(problems[0]) == "fp16 training needs a GPU (no fp16 loss scaling on CPU): use fp32 or bf16 on CPU."


@pytest.mark.skipif(not CPU_ONLY, reason="'auto' resolves to a GPU on this machine")
def test_fp16_with_auto_is_refused_once_auto_resolves_to_cpu():
    cfg = config(train={"device": "auto", "compute_type": "fp16"})
    assert cfg.validate() == []  # the device is not known yet
    device = detect_device("auto")
    assert device == "cpu"
    with pytest.raises(TrainingError, match=r"fp16 training needs a GPU .* use fp32 or bf16 on CPU"):
        check_runtime(cfg, device)


@pytest.mark.parametrize("compute_type", ["fp32", "bf16"])
def test_fp32_and_bf16_train_on_cpu(compute_type):
    cfg = config(train={"device": "cpu", "compute_type": compute_type})
    assert cfg.validate() == []
    check_runtime(cfg, "cpu")  # no exception
    assert _training_args(cfg, _tmp(), "cpu", False, get_stage("sft")).bf16 == (compute_type == "bf16")


def _tmp():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp())


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_asking_for_cuda_without_one_says_what_to_choose():
    with pytest.raises(ModelError, match=r"no CUDA GPU is visible\. Choose 'auto' or 'cpu'"):
        detect_device("cuda")


@pytest.mark.skipif(not NO_MPS, reason="this machine has Apple MPS")
def test_asking_for_mps_without_it_says_what_to_choose():
    with pytest.raises(ModelError, match=r"Apple MPS is not available\. Choose 'auto' or 'cpu'"):
        detect_device("mps")


def test_auto_and_cpu_always_resolve():
    assert detect_device("cpu") == "cpu"
    assert detect_device("auto") in ("cuda", "mps", "cpu")


# -- optimizers ----------------------------------------------------------------------------------


def test_paged_optimizers_fall_back_on_cpu_with_a_reason():
    for name, plain in (("paged_adamw_8bit", "adamw_8bit"), ("paged_adamw_32bit", "adamw_torch")):
        used, why = resolve_optimizer(name, "cpu")
        assert used == plain
        assert "paging needs CUDA unified memory" in why and f"using {plain}" in why


def test_bnb_optimizers_are_kept_where_bitsandbytes_runs_them():
    for name in BNB_OPTIMIZERS:
        assert resolve_optimizer(name, "cuda") == (name, None)
    assert resolve_optimizer("adamw_8bit", "cpu") == ("adamw_8bit", None)  # bnb 0.50 runs 8-bit Adam on CPU


def test_bnb_optimizers_fall_back_to_torch_adamw_where_bitsandbytes_cannot():
    used, why = resolve_optimizer("paged_adamw_8bit", "mps")
    assert used == "adamw_torch" and "no Apple MPS backend" in why
    used, why = resolve_optimizer("adamw_8bit", "cuda", have_bnb=False)
    assert used == "adamw_torch" and "not installed" in why


def test_every_optimizer_maps_to_a_name_transformers_knows():
    from transformers.training_args import OptimizerNames

    for name in OPTIMIZERS:
        for device in ("cpu", "cuda", "mps"):
            OptimizerNames(resolve_optimizer(name, device)[0])  # raises on a name the Trainer would refuse
    assert resolve_optimizer("adafactor", "cpu") == ("adafactor", None)


def test_training_args_get_the_resolved_optimizer():
    cfg = config(train={"device": "cpu", "optimizer": "paged_adamw_8bit"})
    assert _training_args(cfg, _tmp(), "cpu", False, get_stage("sft")).optim == "adamw_8bit"


# -- impossible combinations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "sections, fix",
    [
        ({"quant": {"mode": "4bit"}, "lora": {"init": "pissa"}}, "set lora.init to 'default'"),
        ({"quant": {"mode": "8bit"}, "lora": {"bias": "all"}}, "set lora.bias to 'none'"),
        ({"quant": {"mode": "4bit"}, "train": {"device": "mps"}}, "set quant.mode to 'none'"),
        ({"quant": {"mode": "8bit"}, "lora": {"use_dora": True}, "train": {"device": "cpu"}}, "lora.use_dora off"),
        ({"train": {"device": "cpu", "compute_type": "fp16"}}, "use fp32 or bf16 on CPU"),
    ],
    ids=["pissa+quant", "bias+quant", "quant-on-mps", "dora+8bit-on-cpu", "fp16-on-cpu"],
)
def test_impossible_combinations_name_the_fix(sections, fix):
    problems = config(**sections).validate()
    assert len(problems) == 1 and fix in str(problems[0]), problems


@pytest.mark.parametrize(
    "sections",
    [
        {"quant": {"mode": "4bit"}, "lora": {"use_dora": True}, "train": {"device": "cpu"}},
        {"quant": {"mode": "8bit"}, "train": {"device": "cpu", "optimizer": "paged_adamw_8bit"}},
        {"quant": {"mode": "4bit", "quant_type": "fp4", "compute_dtype": "fp32"}, "train": {"compute_type": "bf16"}},
        {"quant": {"mode": "8bit"}, "lora": {"use_dora": True}, "train": {"device": "cuda"}},
    ],
    ids=["dora+4bit-on-cpu", "8bit+paged-on-cpu", "fp4-fp32-compute", "dora+8bit-on-cuda"],
)
def test_combinations_that_work_pass(sections):
    assert config(**sections).validate() == []


def test_check_runtime_reports_every_device_problem_at_once():
    cfg = config(quant={"mode": "8bit"}, lora={"use_dora": True}, train={"compute_type": "fp16"})
    with pytest.raises(TrainingError) as err:
        check_runtime(cfg, "cpu")
    assert "fp16 training needs a GPU" in str(err.value) and "DoRA on an 8-bit base" in str(err.value)
    with pytest.raises(TrainingError, match="no Apple MPS backend"):
        check_runtime(config(quant={"mode": "4bit"}), "mps")


def test_emulated_bf16_on_a_cpu_is_said_with_the_fix():
    from studio.model.loading import cpu_has_bf16, slow_bf16_hint

    assert cpu_has_bf16("flags : fpu avx2 avx512f") is False
    assert cpu_has_bf16("flags : fpu avx2 avx512f avx512_bf16") is True
    assert cpu_has_bf16("flags : fpu amx_bf16 amx_tile") is True
    hint = slow_bf16_hint("fp32", "4bit", "bf16", "cpu", native=False)
    assert "quant.compute_dtype = bf16 is emulated" in hint and "Set it to fp32" in hint
    assert "train.compute_type and quant.compute_dtype" in slow_bf16_hint("bf16", "4bit", "bf16", "cpu", False)
    assert slow_bf16_hint("bf16", "none", "bf16", "cpu", False).count("train.compute_type") == 1
    # Native bf16, a GPU, an unknown CPU, fp32 math, or bf16 compute of a base that is not 4-bit: nothing to say.
    assert slow_bf16_hint("bf16", "4bit", "bf16", "cpu", True) is None
    assert slow_bf16_hint("bf16", "4bit", "bf16", "cuda", False) is None
    assert slow_bf16_hint("bf16", "4bit", "bf16", "cpu", None) is None
    assert slow_bf16_hint("fp32", "8bit", "bf16", "cpu", False) is None
