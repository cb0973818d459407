"""Shared fixtures. Every test gets its own STUDIO_HOME; the converted bundled model is shared by all
test runs on the machine (STUDIO_MODEL_CACHE), since converting the GGUF costs ~11 s and loading ~0.2 s."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.common import free_port, kill_tree  # noqa: F401 - the process harness, shared with bench/

os.environ.setdefault("STUDIO_MODEL_CACHE", str(Path.home() / ".cache" / "lora-studio" / "models"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    from studio.model.loading import ensure_bundled_model

    return ensure_bundled_model()


@pytest.fixture(scope="session")
def tokenizer(bundled_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model_dir)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty workspace for one test."""
    home = tmp_path / "studio-home"
    monkeypatch.setenv("STUDIO_HOME", str(home))
    from studio.core.workspace import ensure_home

    return ensure_home(home)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_model_dir) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with the bundled tokenizer: for tests of behaviour,
    not of learning quality. It trains in milliseconds per step."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def eval_child_pids(monkeypatch) -> list[int]:
    """The pids of the child processes (the evaluation's, in these tests) started during the test, in order."""
    from studio.core import procs

    pids: list[int] = []
    spawn = procs.spawn

    def record(*args, **kwargs):
        popen = spawn(*args, **kwargs)
        pids.append(popen.pid)
        return popen

    monkeypatch.setattr(procs, "spawn", record)
    return pids
