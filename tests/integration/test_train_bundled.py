"""The bundled model really learns: the quick-demo preset through `studio train` (the real worker
process), then what came out is checked: loss, the answer, the reload, the merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from studio.core.store import RunStatus, Store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is the mascot of LoRA Studio?"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = dict(os.environ, STUDIO_HOME=str(home), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "studio.cli", "train", str(REPO / "presets" / "quick-demo.yaml")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,  # ~300 s on an idle 2-core machine today (140 s on an earlier one): room for load
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = Store(home / "studio.db")
    (run,) = store.list_runs()
    return {"home": home, "run": run, "stdout": proc.stdout, "store": store}


def test_cli_run_completes_and_prints_the_adapter(trained):
    run = trained["run"]
    assert run.status == RunStatus.COMPLETED
    assert f"adapter: {run.adapter_dir}" in trained["stdout"]
    adapter = Path(run.adapter_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "run.json"):
        assert (adapter / name).is_file(), name
    body = json.loads((adapter / "run.json").read_text())
    assert body["base_model"]["source"] == "bundled" and body["global_step"] == run.total_steps


def test_loss_fell(trained):
    points = [m for m in trained["store"].metrics(trained["run"].id) if m.loss is not None]
    assert len(points) >= 10
    first = sum(m.loss for m in points[:3]) / 3
    last = sum(m.loss for m in points[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert all(m.tokens_per_s and m.tokens_per_s > 0 for m in points[1:])
    assert all(m.memory_mb and m.memory_mb > 100 for m in points)


def test_adapter_changed_the_answer(trained):
    from studio.services.chat import ChatSession

    chat = ChatSession()
    chat.add_adapter("demo", trained["run"].adapter_dir)
    base, tuned = chat.compare(QUESTION, "demo")
    assert base != tuned
    assert "Ripple" not in base  # the base cannot know a fictional fact...
    assert "Ripple" in tuned  # ...that the training data taught


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fresh_peft_reload_and_merged_model_match(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.model.loading import ensure_bundled_model
    from studio.reports.export import merge_adapter

    adapter = Path(trained["run"].adapter_dir)
    base_dir = ensure_bundled_model()
    tok = AutoTokenizer.from_pretrained(adapter)
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_logits = _logits(base, ids)
    with_adapter = PeftModel.from_pretrained(base, adapter)  # the plain peft loader, on a fresh base
    adapter_logits = _logits(with_adapter, ids)
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter is really applied

    result = merge_adapter(adapter, tmp_path / "merged")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {n for n, _ in result.files}
    merged = AutoModelForCausalLM.from_pretrained(result.out_dir, dtype=torch.float32)
    # In fp32 the two paths (x@W + s*(x@A)@B vs x@(W + s*B@A)) round differently over 30 layers:
    # ~2e-4 on logits of magnitude ~35. Evaluated in float64, only the merge itself is compared.
    assert (_logits(merged, ids) - adapter_logits).abs().max() < 1e-3
    merged_64 = _logits(merged.double(), ids)
    adapter_64 = _logits(with_adapter.double(), ids)
    assert (merged_64 - adapter_64).abs().max() < 1e-4


def test_cli_exports_merged_and_adapter(trained, tmp_path):
    env = dict(os.environ, STUDIO_HOME=str(trained["home"]), HF_HUB_OFFLINE="1")
    run_id = trained["run"].id
    out = subprocess.run(
        [sys.executable, "-m", "studio.cli", "export", run_id, "--adapter", str(tmp_path / "a"), "--zip"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file() and (tmp_path / "a.zip").is_file()
    again = subprocess.run(
        [sys.executable, "-m", "studio.cli", "export", run_id, "--adapter", str(tmp_path / "a")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 1 and again.stderr.startswith("error:") and "not empty" in again.stderr


def test_worker_runs_under_the_allocator_it_reports(trained):
    """The worker preloads tcmalloc when the machine has it (make installs it) and says which one it got."""
    from studio.core.allocator import choose_allocator

    messages = [e.message for e in trained["store"].events(trained["run"].id)]
    (said,) = [m for m in messages if m.startswith("Memory allocator:")]
    expected = choose_allocator()
    if expected.path is not None:
        assert said == f"Memory allocator: {expected.name}"
    else:
        assert said.startswith("Memory allocator: glibc malloc") and expected.note in said
