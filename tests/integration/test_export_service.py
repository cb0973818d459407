"""Export through its child process: studio.services.exporter runs `studio export --json` on a real tiny
adapter and reads its JSON lines; the merged folder is an ordinary model that answers as base + adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from studio.core import procs
from studio.services.exporter import export_events, run_export

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter on the tiny Llama, saved by PEFT; B is random (not zero) so merging changes weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("tiny-adapter")
    get_peft_model(base, config).save_pretrained(out)
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_merge_reports_progress_then_a_result_and_writes_an_ordinary_model(home, tiny_adapter, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = home / "exports" / "tiny-merged"
    out.parent.mkdir(parents=True)
    events = list(export_events(home, str(tiny_adapter), "merged", out))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "result", [(e.kind, e.message) for e in events]
    assert kinds[:-1] and set(kinds[:-1]) == {"progress"} and all(e.message for e in events)
    result = events[-1].data
    assert Path(result["out_dir"]) == out.resolve()
    names = {name for name, _ in result["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert result["zip"] == str(out.resolve().with_suffix(".zip")) and Path(result["zip"]).is_file()
    assert not list(out.parent.glob(".export-*"))  # no temporary folder left behind

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.allclose(_logits(merged, ids), _logits(with_adapter, ids), atol=1e-4)
    assert not torch.allclose(_logits(merged, ids), _logits(base, ids), atol=1e-4)


def test_adapter_only_export_and_errors_come_back_as_json(home, tiny_adapter, eval_child_pids):
    out = home / "exports" / "tiny-adapter"
    done = run_export(home, str(tiny_adapter), "adapter", out)
    assert done.kind == "result" and "adapter_model.safetensors" in {n for n, _ in done.data["files"]}
    assert (out / "adapter_config.json").is_file()

    again = run_export(home, str(tiny_adapter), "adapter", out)  # not empty, and no overwrite
    assert again.kind == "error" and "exists and is not empty" in again.message and again.data["code"] == 1
    assert run_export(home, str(tiny_adapter), "adapter", out, overwrite=True).kind == "result"

    missing = run_export(home, "no-such-run", "merged", home / "exports" / "x")
    assert missing.kind == "error" and "no-such-run" in missing.message
    assert len(eval_child_pids) == 4 and not any(procs.process_alive(pid) for pid in eval_child_pids)
