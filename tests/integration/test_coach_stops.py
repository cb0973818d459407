"""The coach stops real runs in real worker processes: a learning rate far too high makes the bundled model's
loss explode and the run ends failed with the reason and the fix, long before max_steps and with no broken
state saved; early stopping ends a run whose eval loss stopped improving, completed, with the best adapter.

The divergence run needs a pretrained model: the tiny random Llama cannot blow up (its final RMSNorm and small
tied embeddings bound the logits, so at lr 0.9 its loss just sits at ln(vocab) ~ 10.6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.core.config import RunConfig
from studio.core.store import RunStatus
from studio.core.workspace import RunDir, checkpoint_step
from studio.training.coach import advice_for_run
from tests.builders import small_run_config

pytestmark = pytest.mark.integration


def small_config(source: str, max_steps: int, **train) -> RunConfig:
    return small_run_config(source, "coach", train={"max_steps": max_steps, **train})


def test_an_exploding_loss_stops_the_run_as_failed_with_the_fix(jobs, bundled_model_dir):
    cfg = small_config(
        "bundled", max_steps=60, learning_rate=0.9, max_grad_norm=0.0, batch_size=2, save_steps=2, save_total_limit=10
    )
    run = jobs.submit(cfg)
    done = jobs.wait(run.id, timeout=240)

    assert done.status == RunStatus.FAILED, (done.status, done.error)
    assert done.step <= 15, done.step  # stopped within a few logs of the blow-up, not at max_steps=60
    message = done.error.split("\n\n--- last log lines ---")[0]
    assert message.startswith(f"Stopped at step {done.step} because the loss is exploding"), message
    assert "train.learning_rate" in message and "train.max_grad_norm" in message
    run_dir = jobs.run_dir(run.id)
    assert not (run_dir / "adapter").exists()  # a broken state is never handed out as an adapter

    # The Runs tab's coach says the same after the fact, from the store alone.
    (advice, *_) = advice_for_run(jobs.store, done)
    assert advice.rule == "exploding" and advice.severity == "critical" and "train.learning_rate" in advice.fix
    # No checkpoint of the diverged state survives: every one left predates the loss at advice.step.
    left = RunDir(run_dir).checkpoint_dirs()
    assert all(checkpoint_step(p) < advice.step - 1 for p in left), left
    metrics = [m for m in jobs.store.metrics(run.id) if m.loss is not None]
    assert max(m.loss for m in metrics) > 2 * metrics[0].loss  # it really blew up

    events = jobs.store.events(run.id)
    assert any(e.level == "error" and e.message.startswith("Stopping the run: The loss is exploding") for e in events)
    facts = json.loads(RunDir(run_dir).data_facts.read_text())
    assert facts["samples"] == 72 and facts["cutoff_len"] == 64 and 0 < facts["truncated_share"] < 1


def test_early_stopping_completes_the_run_with_the_best_adapter(jobs, home, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.training.stages.sft import Collator, split_data

    # At a constant lr of 0.9 the tiny model's eval loss plateaus within a few evaluations.
    cfg = small_config(
        str(tiny_model_dir),
        max_steps=200,
        learning_rate=0.9,
        lr_scheduler="constant",
        batch_size=8,
        eval_steps=2,
        save_steps=1000,
        early_stopping_patience=3,
    )
    cfg.data.val_size = 0.1
    run = jobs.submit(cfg)
    done = jobs.wait(run.id, timeout=240)

    assert done.status == RunStatus.COMPLETED, done.error
    assert done.step < 200 and done.adapter_dir
    evals = [(m.step, m.eval_loss) for m in jobs.store.metrics(run.id) if m.eval_loss is not None]
    best_step, best = min(evals, key=lambda e: e[1])
    after_best = [s for s, _ in evals if s > best_step]
    assert after_best == [best_step + 2, best_step + 4, best_step + 6]  # stopped at the third without a gain
    assert done.step == evals[-1][0]
    messages = [e.message for e in jobs.store.events(run.id)]
    assert (
        f"Early stopping at step {done.step}: eval loss has not improved for 3 evaluations "
        f"(best {best:.4g} at step {best_step})" in messages
    ), messages
    summary = json.loads((Path(done.adapter_dir) / "run.json").read_text())["early_stopping"]
    assert summary == {
        "stopped_at": done.step,
        "best_step": best_step,
        "best_eval_loss": pytest.approx(best),
        "adapter_is_best": True,
    }

    # The saved adapter is the best state, not the last: its eval loss is the best one, not the last one.
    assert abs(evals[-1][1] - best) > 1e-4  # the two differ, so the check below can tell them apart
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    split = split_data(cfg, tokenizer, home)
    batch = Collator(tokenizer.pad_token_id)(
        [{"input_ids": list(s.input_ids), "labels": list(s.labels)} for s in split.eval_samples]
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), done.adapter_dir).eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(best, abs=1e-4), (loss, best, evals[-1][1])
