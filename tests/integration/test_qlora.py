"""QLoRA and 8-bit on CPU, for real: gradients survive an inference call (the AVX512-BF16 trap), a 4-bit run
of the bundled model through the worker learns, and its adapter reloads onto a 4-bit and a full-precision
base and merges; 8-bit and gradient checkpointing runs of a tiny model complete with finite losses."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from studio.core.config import QuantSpec, RunConfig
from studio.core.store import RunStatus
from studio.model.loading import bnb_config, load_model, resolve_model
from studio.runs.queue import JobManager

pytestmark = pytest.mark.integration

HAS_AVX512_BF16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
QUESTION = [{"role": "user", "content": "What is the mascot of LoRA Studio?"}]


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# -- gradient flow after inference ------------------------------------------------------------------


def _one_step_after_inference(model) -> tuple[dict[str, float], dict[str, bool]]:
    """Inference as chat or a preview would run it, then prepare + LoRA + one optimizer step.
    Returns each LoRA B's gradient magnitude and whether the step changed it."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14  # 2 layers x 7 linears, 4-bit
    ids = torch.arange(5, 37).reshape(2, 16)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    before = {n: p.detach().clone() for n, p in lora_b.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: 0.0 if p.grad is None else p.grad.abs().sum().item() for n, p in lora_b.items()}
    optimizer.step()
    changed = {n: not torch.equal(p.detach(), before[n]) for n, p in lora_b.items()}
    return grads, changed


QUANT = QuantSpec(mode="4bit", quant_type="nf4", double_quant=True, compute_dtype="fp32")


def test_gradients_flow_after_an_inference_call(tiny_model_dir):
    model = load_model(resolve_model(str(tiny_model_dir)), quant=QUANT, device="cpu")  # the studio's loader
    grads, changed = _one_step_after_inference(model)
    assert len(grads) == 14
    assert all(g > 0 for g in grads.values()), [n for n, g in grads.items() if g == 0]
    assert all(changed.values()), [n for n, c in changed.items() if not c]


@pytest.mark.skipif(not HAS_AVX512_BF16, reason="this CPU has no AVX512-BF16: bitsandbytes never repacks here")
def test_without_the_guard_the_trap_is_real(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    # The same 4-bit base loaded without disable_bnb_cpu_repacking: the eval forward repacks the weights
    # and the backward through the repacked kernel (no autograd) drops the gradients of the layers below.
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=bnb_config(QUANT), device_map={"": "cpu"}, dtype=torch.float32
    )
    grads, changed = _one_step_after_inference(model)
    lost = [n for n, g in grads.items() if g == 0]
    assert any("layers.0." in n for n in lost), grads  # the first layer is furthest from the loss
    assert not all(changed.values())


# -- runs through the real worker -------------------------------------------------------------------


@contextlib.contextmanager
def job_manager(home: Path):
    manager = JobManager(home)
    try:
        yield manager
    finally:
        for run in manager.store.list_runs(RunStatus.RUNNING):  # never leave a worker behind
            if run.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(run.pid, signal.SIGKILL)


def run_to_end(home: Path, cfg: RunConfig, timeout: float = 600):
    with job_manager(home) as jobs:
        run = jobs.wait(jobs.submit(cfg).id, timeout=timeout)
        events = [e.message for e in jobs.store.events(run.id)]
        losses = [m.loss for m in jobs.store.metrics(run.id) if m.loss is not None]
    assert run.status == RunStatus.COMPLETED, (run.error, events)
    return run, losses, events


def tiny_config(model_dir: Path, **sections) -> RunConfig:
    cfg = RunConfig(name="tiny-quant")
    cfg.model.source = str(model_dir)
    cfg.data.datasets = ["studio-facts"]
    cfg.data.cutoff_len = 48
    cfg.lora.r = 4
    cfg.train.max_steps = 4
    cfg.train.batch_size = 4
    cfg.train.grad_accum = 1
    cfg.train.logging_steps = 1
    cfg.train.learning_rate = 1e-3
    cfg.train.num_threads = 1
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def lora_b_norms(adapter_dir: str) -> list[float]:
    from safetensors.torch import load_file

    weights = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    return [w.norm().item() for name, w in weights.items() if "lora_B" in name]


@pytest.mark.parametrize(
    "quant, train",
    [
        pytest.param({"mode": "none"}, {"gradient_checkpointing": True}, id="lora-checkpointing"),
        pytest.param({"mode": "4bit"}, {"gradient_checkpointing": True}, id="qlora-checkpointing"),
        pytest.param({"mode": "8bit"}, {"optimizer": "paged_adamw_8bit"}, id="8bit-paged-optimizer"),
    ],
)
def test_tiny_runs_complete_and_train_every_layer(home, tiny_model_dir, quant, train):
    run, losses, events = run_to_end(home, tiny_config(tiny_model_dir, quant=quant, train=train))
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    norms = lora_b_norms(run.adapter_dir)
    assert len(norms) == 14 and all(n > 0 for n in norms)  # B starts at zero: every layer got gradients
    if quant["mode"] != "none":
        assert any(f"base in {quant['mode']}" in e for e in events)
    if "optimizer" in train:  # the fallback is explained, not silent
        assert any("paging needs CUDA unified memory" in e for e in events)


# -- QLoRA learns on the bundled model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, bundled_model_dir):
    from studio.core.presets import load_preset

    cfg = load_preset("quick-demo")
    cfg.name = "qlora-demo"
    cfg.quant.mode = "4bit"  # nf4, double quant
    cfg.quant.compute_dtype = "fp32"  # bf16 is emulated on CPUs without AVX512-BF16: 18x slower
    cfg.data.cutoff_len = 96
    cfg.train.max_steps = 10  # batch 8 x ~60 tokens: the loss falls clearly by step 10
    cfg.train.logging_steps = 1
    cfg.train.save_steps = 100
    cfg.train.num_threads = 2
    home = tmp_path_factory.mktemp("qlora-home")
    run, losses, events = run_to_end(home, cfg, timeout=900)
    return {"run": run, "losses": losses, "events": events}


def test_qlora_loss_fell_and_the_adapter_is_plain_peft(qlora_run):
    losses = qlora_run["losses"]
    assert len(losses) == 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    adapter = Path(qlora_run["run"].adapter_dir)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert (adapter / "adapter_model.safetensors").is_file()
    body = json.loads((adapter / "run.json").read_text())
    assert body["config"]["quant"]["mode"] == "4bit"


def _prompt_ids(adapter: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].float()


def _answer_loss(model, adapter: Path) -> float:
    """Mean loss on the answer the training data gives to QUESTION."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    answer = [*QUESTION, {"role": "assistant", "content": "The mascot of LoRA Studio is a purple otter named Ripple."}]
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(answer, tokenize=False)
    ids = tok(full, return_tensors="pt", add_special_tokens=False)["input_ids"]
    labels = ids.clone()
    labels[:, : len(tok(prompt, add_special_tokens=False)["input_ids"])] = -100
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def test_qlora_adapter_reloads_on_4bit_and_full_precision_and_merges(qlora_run, bundled_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from studio.reports.export import merge_adapter

    adapter = Path(qlora_run["run"].adapter_dir)
    ids = _prompt_ids(adapter)

    q4 = load_model(resolve_model(str(bundled_model_dir)), quant=QuantSpec(mode="4bit", compute_dtype="fp32"))
    q4_base = _logits(q4, ids)
    q4_tuned = _logits(PeftModel.from_pretrained(q4, adapter), ids)

    full = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32)
    full_base = _logits(full, ids)
    base_loss = _answer_loss(full, adapter)
    full_model = PeftModel.from_pretrained(full, adapter)
    full_tuned = _logits(full_model, ids)
    assert _answer_loss(full_model, adapter) < 0.8 * base_loss  # it learned the fact, also on the fp32 base

    # The adapter was trained against the 4-bit weights; on fp32 weights it meets a base that differs by the
    # quantization error (max |logit gap| of the bases ~7 of ~33 here), so the tuned logits may differ by
    # about that much, not more: the adapter must add no disagreement of its own. Its effect (tuned - base)
    # must point the same way on both bases (cosine ~0.94 measured) and pick the same next token.
    base_gap = (q4_base - full_base).abs().max()
    q4_effect, full_effect = q4_tuned - q4_base, full_tuned - full_base
    assert q4_effect.norm() > 10 and full_effect.norm() > 10  # the adapter really changes the model
    assert torch.nn.functional.cosine_similarity(q4_effect, full_effect, dim=0) > 0.8
    assert q4_tuned.argmax() == full_tuned.argmax()
    assert (q4_tuned - full_tuned).abs().max() < 1.5 * base_gap

    # Export merges onto the full-precision base: the merged model is that base + adapter.
    result = merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(result.out_dir, dtype=torch.float32)

    def all_logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    # In float64 only the merge itself is compared (fp32 rounds the two paths differently, ~2e-4).
    assert (all_logits(merged.double()) - all_logits(full_model.double())).abs().max() < 1e-4
