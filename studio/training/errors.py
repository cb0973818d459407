"""How a training run fails: the error a run raises itself."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why and what to change."""
