"""Shared fixtures. Every test gets its own STUDIO_HOME; the converted bundled model is shared by all
test runs on the machine (STUDIO_MODEL_CACHE), since converting the GGUF costs ~11 s and loading ~0.2 s."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("STUDIO_MODEL_CACHE", str(Path.home() / ".cache" / "lora-studio" / "models"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    from studio.models import ensure_bundled_model

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
    from studio.paths import ensure_home

    return ensure_home(home)
