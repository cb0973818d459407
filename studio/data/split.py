"""The train/eval split: which rows a run holds out. Training, evaluation and the dataset audit share it,
so `studio eval` scores exactly the rows a run never trained on and the audit's leakage check looks at the
real split."""

from __future__ import annotations

import random

from studio.data.errors import DataError


def split_indices(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(eval, train) indices into n samples: a seeded shuffle, the first round(n * val_size) held out (at
    least one when val_size > 0). Training, evaluation and the dataset audit's leakage check share it, so
    `studio eval` scores exactly the rows a run never trained on."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = round(n * val_size) if val_size > 0 else 0
    if val_size > 0 and n_eval == 0:
        n_eval = 1
    if n_eval >= n:
        raise DataError(f"val_size={val_size} leaves no training samples out of {n}. Lower data.val_size.")
    return order[:n_eval], order[n_eval:]
