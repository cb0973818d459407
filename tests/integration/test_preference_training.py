"""Preference training really moves the bundled model (issue 15): the quick-dpo preset through `studio
train` (the real worker), then what came out: held-out reward accuracy and margins, the answer's style, the
saved adapter (the trained one only, loadable by plain peft)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from studio.core.store import RunStatus, Store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# Not in studio-prefs (its prompts are paraphrases of seven facts and twelve general questions).
HELD_OUT = [{"role": "user", "content": "Could you tell me which animal LoRA Studio uses as its mascot?"}]


def train_preset(home: Path, preset: str, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, STUDIO_HOME=str(home), HF_HUB_OFFLINE="1")
    sets = [arg for override in overrides for arg in ("--set", override)]
    return subprocess.run(
        [sys.executable, "-m", "studio.cli", "train", str(REPO / "presets" / f"{preset}.yaml"), *sets],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,  # a few minutes on an idle 2-core machine: room for a loaded one
    )


@pytest.fixture(scope="module")
def dpo(tmp_path_factory):
    home = tmp_path_factory.mktemp("dpo-home")
    proc = train_preset(home, "quick-dpo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = Store(home / "studio.db")
    (run,) = store.list_runs()
    return {"home": home, "run": run, "store": store, "metrics": store.metrics(run.id)}


def test_the_dpo_run_completes_with_only_the_trained_adapter_saved(dpo):
    run = dpo["run"]
    assert run.status == RunStatus.COMPLETED and run.config["stage"] == "dpo"
    adapter = Path(run.adapter_dir)
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    assert json.loads((adapter / "run.json").read_text())["config"]["stage"] == "dpo"


def test_held_out_reward_accuracy_and_margins_rise(dpo):
    evals = [(m.step, m.eval_reward_accuracy, m.eval_reward_margin) for m in dpo["metrics"]]
    evals = [e for e in evals if e[1] is not None]
    assert len(evals) >= 4, evals  # every 5 of 20 steps
    # A fresh adapter scores every pair a tie (~50% by chance); the trained one ranks the held-out pairs right.
    assert evals[-1][1] >= 0.8, evals
    margins = [margin for _, _, margin in evals]
    assert margins[-1] > margins[0] and margins[-1] > 0.5, evals
    train = [m.reward_margin for m in dpo["metrics"] if m.reward_margin is not None]
    assert sum(train[-3:]) / 3 > sum(train[:3]) / 3, train


def answer_logprob(model, tokenizer, prompt: list[dict], answer: str) -> float:
    """Summed log-probability of the answer's tokens after the prompt, as the chat template renders them."""
    import torch

    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
    start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    return float(logprobs[start - 1 :].gather(1, targets[start - 1 :, None]).sum())


def test_on_a_held_out_prompt_the_model_moves_towards_the_chosen_style(dpo):
    """The model's own preference (log-prob of a chosen-style answer minus a rejected-style one) on a prompt
    it never saw grows well beyond the base model's, read through the plain peft loader."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.model.loading import ensure_bundled_model

    adapter = dpo["run"].adapter_dir
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(ensure_bundled_model(), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    fact = "The mascot of LoRA Studio is a purple otter named Ripple."
    chosen, rejected = f"Ripple here! {fact}", f"{fact} Then again, I could be mistaken about this."

    def margin() -> float:
        return answer_logprob(model, tokenizer, HELD_OUT, chosen) - answer_logprob(model, tokenizer, HELD_OUT, rejected)

    tuned = margin()
    with model.disable_adapter():
        before = margin()
    assert tuned > before + 5, (before, tuned)  # nats: the held-out preference moved clearly


def test_evaluate_reports_the_held_out_preference_with_and_without_the_adapter(dpo):
    from studio.reports.evaluate import EvalSpec, evaluate_run

    report = evaluate_run(EvalSpec(dpo["run"].id, max_samples=14, gen_samples=2, max_new_tokens=24), dpo["home"])
    pref = report.preference
    assert pref is not None and pref.pairs == 14
    # The raw ranking (summed log-probs) favours short answers: the base already puts the short refusals
    # ("I don't know.") above the chosen ones (measured: base 71%, adapter 79% of 14 pairs). The margin is
    # the clear signal: measured +3.8 nats (base) -> +41 (adapter).
    assert pref.accuracy.adapter >= pref.accuracy.base, pref
    assert pref.margin.adapter > pref.margin.base + 20, pref  # nats, mean over the held-out pairs
