"""The memory planner: exact weight bytes on a config small enough to count by hand, the published 7B ranges,
the 8B shapes, how each knob moves its term, validation, suggestions, and `studio plan`'s exit codes.

The 7B/8B figures use the usual recipes (FIELD-NOTES.md), on CUDA (so with the CUDA-context item),
batch 1, cutoff 1024, gradient checkpointing on:
- LoRA: r=16 on all linear layers, bf16 base and compute, adamw_torch;
- QLoRA: NF4 with double quantization, bf16 compute, paged_adamw_8bit.
"""

import pytest
from transformers import LlamaConfig

from studio.core.config import RunConfig
from studio.model.memory import (
    GB,
    PlanError,
    device_free_memory,
    model_shapes,
    plan_memory,
    suggestions,
)

LLAMA2_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
LLAMA3_8B = {**LLAMA2_7B, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def run(quant="none", **train):
    lora_train = {"batch_size": 1, "compute_type": "bf16", "gradient_checkpointing": True, "optimizer": "adamw_torch"}
    sections = {"lora": {"r": 16, "target_modules": "all-linear"}, "data": {"cutoff_len": 1024}}
    if quant == "4bit":
        sections["quant"] = {"mode": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"}
        lora_train["optimizer"] = "paged_adamw_8bit"
    elif quant == "8bit":
        sections["quant"] = {"mode": "8bit"}
    sections["train"] = {**lora_train, **train}
    return RunConfig.from_dict(sections)


def with_(cfg: RunConfig, section: str, **fields) -> RunConfig:
    return RunConfig.from_dict({**cfg.to_dict(), section: {**cfg.to_dict()[section], **fields}})


@pytest.fixture(scope="module")
def llama7b():
    config = LlamaConfig(**LLAMA2_7B)
    return config, model_shapes(config)


@pytest.fixture(scope="module")
def llama8b():
    config = LlamaConfig(**LLAMA3_8B)
    return config, model_shapes(config)


@pytest.fixture(scope="module")
def small():
    config = LlamaConfig(**SMALL)
    return config, model_shapes(config)


def plan(model, cfg, device="cuda"):
    config, shapes = model
    return plan_memory(config, cfg, device, shapes)


# -- exact counts on a small config ---------------------------------------------------------------
# Per layer: q 64x64, k and v 32x64 (2 KV heads of 16), o 64x64, gate/up/down 128x64: 36,864 linear
# weights, plus 2 norms of 64. Embedding and untied head 1000x64 each, final norm 64.
SMALL_LINEAR = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)  # 73,728 quantizable weights
SMALL_TOTAL = 64_000 + SMALL_LINEAR + 2 * 128 + 64 + 64_000  # 202,048


def test_small_config_weight_bytes_by_hand(small):
    assert small[1].total_params == SMALL_TOTAL == 202_048
    base = run(compute_type="fp32")
    assert plan(small, base).item("base weights").bytes == 4 * SMALL_TOTAL
    assert plan(small, with_(base, "train", compute_type="bf16")).item("base weights").bytes == 2 * SMALL_TOTAL
    rest_fp32 = 4 * (SMALL_TOTAL - SMALL_LINEAR)  # peft casts embeddings, norms and head to fp32
    blocks = SMALL_LINEAR // 64  # 1,152 absmax values
    nf4_dq = SMALL_LINEAR // 2 + blocks * 1 + (blocks / 256) * 4  # 36,864 + 1,152 + 18
    assert plan(small, run("4bit")).item("base weights").bytes == int(nf4_dq) + rest_fp32
    no_dq = with_(run("4bit"), "quant", double_quant=False)
    assert plan(small, no_dq).item("base weights").bytes == SMALL_LINEAR // 2 + blocks * 4 + rest_fp32
    rows = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # output features of q, k, v, o, gate, up, down
    assert plan(small, run("8bit")).item("base weights").bytes == SMALL_LINEAR + 4 * rows + rest_fp32


def test_tied_embeddings_count_once():
    config = LlamaConfig(**{**SMALL, "tie_word_embeddings": True})
    assert model_shapes(config).total_params == SMALL_TOTAL - 64_000


def test_lora_params_match_the_skeleton_count(small):
    from studio.model.loading import build_skeleton, count_lora_parameters

    cfg = with_(run(), "lora", r=8)
    # r*(in+out): q 8*128, k 8*96, v 8*96, o 8*128, gate/up/down 8*192 -> 8,192 per layer
    assert plan(small, cfg).trainable_params == 2 * 8192
    assert count_lora_parameters(build_skeleton(small[0]), cfg.lora).trainable == 2 * 8192
    p = plan(small, cfg)
    assert p.item("LoRA weights").bytes == p.item("gradients").bytes == 4 * 2 * 8192
    assert p.item("optimizer states").bytes == 8 * 2 * 8192  # AdamW: two fp32 states


# -- the published 7B ranges, and 8B ----------------------------------------------------------------


def test_llama2_7b_lora_bf16_lands_in_the_published_range(llama7b):
    total = plan(llama7b, run()).total_bytes
    assert 14 * GB <= total <= 18 * GB, total / GB


def test_llama2_7b_qlora_lands_in_the_published_range(llama7b):
    total = plan(llama7b, run("4bit")).total_bytes
    assert 5 * GB <= total <= 8 * GB, total / GB


def test_llama3_8b_bands(llama8b, llama7b):
    # 8B = the 7B recipe plus 1.3 B more parameters (2.6 GB in bf16) and a 4x vocabulary: logits of
    # 1024 x 128,256 x 14 B (1.8 GB). QLoRA keeps its 1.05 B embedding+head parameters in fp32 (peft's
    # prepare_model_for_kbit_training), 4.2 GB, so 8B QLoRA sits well above 7B's 5-8 GB.
    lora, qlora = plan(llama8b, run()).total_bytes, plan(llama8b, run("4bit")).total_bytes
    assert 17 * GB <= lora <= 23 * GB, lora / GB
    assert 9 * GB <= qlora <= 14 * GB, qlora / GB
    assert lora > plan(llama7b, run()).total_bytes and qlora > plan(llama7b, run("4bit")).total_bytes


def test_weights_shrink_with_bit_width(llama7b):
    nf4, int8, bf16 = (plan(llama7b, run(q)).item("base weights").bytes for q in ("4bit", "8bit", "none"))
    assert nf4 < int8 < bf16
    fp32 = plan(llama7b, run(compute_type="fp32")).item("base weights").bytes
    assert fp32 == 2 * bf16


def test_checkpointing_lowers_activations(llama7b):
    on = plan(llama7b, run()).item("activations").bytes
    off = plan(llama7b, run(gradient_checkpointing=False)).item("activations").bytes
    assert on * 5 < off


def test_logits_scale_with_vocab_and_tokens():
    a = LlamaConfig(**SMALL)
    b = LlamaConfig(**{**SMALL, "vocab_size": 2000})
    cfg = run()
    la, lb = (plan_memory(c, cfg, "cuda").item("logits and loss").bytes for c in (a, b))
    assert lb == 2 * la
    doubled = plan_memory(a, with_(cfg, "train", batch_size=2), "cuda").item("logits and loss").bytes
    assert doubled == 2 * la


def test_activations_grow_with_batch_cutoff_and_rank(small):
    base = plan(small, run(gradient_checkpointing=False)).item("activations").bytes
    assert plan(small, run(gradient_checkpointing=False, batch_size=2)).item("activations").bytes == 2 * base
    longer = with_(run(gradient_checkpointing=False), "data", cutoff_len=2048)
    assert plan(small, longer).item("activations").bytes > base
    bigger_r = with_(run(gradient_checkpointing=False), "lora", r=24)
    assert plan(small, bigger_r).item("activations").bytes > base


def test_optimizers_rank_as_expected(small):
    sizes = {
        o: plan(small, run(optimizer=o)).item("optimizer states").bytes for o in ("adamw_torch", "adamw_8bit", "sgd")
    }
    assert sizes["sgd"] == 0 < sizes["adamw_8bit"] < sizes["adamw_torch"]


def test_cpu_overhead_differs_from_cuda(small):
    cpu, cuda = plan(small, run(compute_type="fp32"), "cpu"), plan(small, run(compute_type="fp32"), "cuda")
    assert cpu.item("overhead").bytes != cuda.item("overhead").bytes
    assert "total" in cpu.describe() and "base weights" in cpu.describe()


# -- validation, fits, suggestions ---------------------------------------------------------------


def test_impossible_combinations_are_all_reported(small):
    cfg = RunConfig.from_dict(
        {
            "lora": {"r": 100, "init": "pissa"},
            "quant": {"mode": "4bit"},
            "data": {"cutoff_len": 4096},
            "train": {"compute_type": "fp16", "device": "cpu"},
        }
    )
    with pytest.raises(PlanError) as err:
        plan(small, cfg, "cpu")
    paths = [p.path for p in err.value.problems]
    for path in ("lora.init", "train.compute_type", "data.cutoff_len", "lora.r"):
        assert path in paths, path
    text = "\n".join(map(str, err.value.problems))
    for needle in ("PiSSA", "fp16", "cutoff_len=4096", "lora.r=100"):
        assert needle in text, needle
    with pytest.raises(PlanError, match="nope_proj"):
        plan(small, with_(run(), "lora", target_modules=["q_proj", "nope_proj"]))
    with pytest.raises(PlanError, match="'mps'"):
        plan(small, run(), "mps")


def test_datasets_are_not_needed_to_plan(small):
    assert run().data.datasets == [] and plan(small, run()).total_bytes > 0


def test_fits():
    config = LlamaConfig(**SMALL)
    p = plan_memory(config, run(), "cuda")
    assert p.fits(p.total_bytes) is True and p.fits(p.total_bytes - 1) is False and p.fits(None) is None


def test_suggestions_fit_first_and_each_lowers_the_estimate(llama7b):
    config, shapes = llama7b
    cfg = run(gradient_checkpointing=False, batch_size=4)
    current = plan(llama7b, cfg).total_bytes
    available = int(30 * GB)  # only checkpointing brings ~47 GB under this
    tips = suggestions(config, cfg, available, "cuda", shapes)
    changes = [t.change for t in tips]
    assert any("QLoRA" in c for c in changes) and any("checkpointing" in c for c in changes)
    assert any("batch 4 -> 2" in c for c in changes) and any("cutoff 1024 -> 512" in c for c in changes)
    assert any("rank 16 -> 8" in c for c in changes)
    assert all(t.plan.total_bytes < current for t in tips)
    fit_flags = [t.plan.fits(available) for t in tips]
    assert fit_flags[0] and fit_flags == sorted(fit_flags, reverse=True)
    halved = next(t for t in tips if "batch" in t.change).config.train
    assert (halved.batch_size, halved.grad_accum) == (2, cfg.train.grad_accum * 2)


def test_suggestions_skip_changes_that_make_the_config_invalid(small):
    cfg = with_(run(), "lora", init="pissa")
    assert not any("QLoRA" in t.change for t in suggestions(small[0], cfg, 1, "cuda", small[1]))


def test_cpu_free_memory_is_what_the_system_can_give():
    import psutil

    free = device_free_memory("cpu")
    assert free is not None and 0 < free <= psutil.virtual_memory().total


# -- studio plan ----------------------------------------------------------------------------------


def test_cli_plan_exit_codes(home, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from studio.cli.main import main
    from studio.model import memory as planner

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  source: {tiny_model_dir}\ndata:\n  cutoff_len: 128\ntrain:\n  batch_size: 4\n")
    monkeypatch.setattr(planner, "device_free_memory", lambda device: 100 * 2**30)
    assert main(["plan", str(cfg), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "base weights" in out and "fits" in out
    monkeypatch.setattr(planner, "device_free_memory", lambda device: 2**20)
    assert main(["plan", str(cfg), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "cutoff 128 -> 64" in out
    assert main(["plan", str(cfg), "--set", "lora.r=0", "--set", "data.cutoff_len=100000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "lora.r" in err and "cutoff_len=100000" in err


def test_allocator_caveat_only_for_cpu_under_glibc():
    from studio.model.memory import allocator_caveat

    assert allocator_caveat("cuda", "system") is None
    assert allocator_caveat("cpu", "tcmalloc") is None
    assert "libtcmalloc-minimal4" in allocator_caveat("cpu", "system")


# -- preference stages ----------------------------------------------------------------------------


def test_preference_stages_double_the_rows_and_add_the_reference_pass(llama8b):
    sft = plan(llama8b, run())
    items = {i.name: i.bytes for i in sft.items}
    dpo_cfg = with_(run(), "data", cutoff_len=1024)
    dpo_cfg.stage = "dpo"
    dpo = {i.name: i for i in plan(llama8b, dpo_cfg).items}
    assert dpo["activations"].bytes == 2 * items["activations"]
    assert dpo["logits and loss"].bytes == 2 * items["logits and loss"]
    assert dpo["reference pass"].bytes > 0 and "reference pass" not in items
    assert dpo["base weights"].bytes == items["base weights"]  # the reference is no second copy of the model
    dpo_cfg.preference.loss_type = "simpo"  # reference-free
    assert "reference pass" not in {i.name for i in plan(llama8b, dpo_cfg).items}
    dpo_cfg.stage, dpo_cfg.preference.loss_type = "orpo", "sigmoid"
    assert "reference pass" not in {i.name for i in plan(llama8b, dpo_cfg).items}
    kto_cfg = run()
    kto_cfg.stage = "kto"
    kto = {i.name: i.bytes for i in plan(llama8b, kto_cfg).items}
    assert kto["activations"] == items["activations"] and kto["reference pass"] > 0
