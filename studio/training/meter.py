"""What a run measures of itself: tokens handed to the model, speed, peak memory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from studio.core.procs import peak_rss_mb
from studio.training.launch import RankInfo, reduce_over_ranks


@dataclass
class TokenCounter:
    """Training tokens handed to the model; the collator adds, the speed meter reads. `total` counts real
    tokens, `positions` every position computed (padding included); held-out rows are not counted."""

    total: int = 0
    positions: int = 0
    samples: int = 0

    @property
    def padding_share(self) -> float:
        return 1 - self.total / self.positions if self.positions else 0.0


def finite(value: Any) -> float | None:
    """The value as a float, or None when it is missing, not a number, or not finite."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def throughput(runtime: Any, counter: TokenCounter, device: str, rank: RankInfo = RankInfo()) -> dict[str, float]:
    """The training loop's speed: real tokens over the Trainer's own train_runtime (this session's part of
    the run when resumed), the padding share and the process's peak memory. With several processes the
    tokens are every process's together (a collective: every process calls this)."""
    runtime = finite(runtime) or 0.0
    total, positions = counter.total, counter.positions
    if rank.distributed:
        where = f"cuda:{rank.local_rank}" if device == "cuda" else "cpu"
        total, positions = reduce_over_ranks([total, positions], "sum", where)
    return {
        "train_runtime_s": round(runtime, 3),
        "real_tokens": total,
        "tokens_per_s": round(total / runtime, 2) if runtime > 0 else 0.0,
        "padding_share": round(1 - total / positions, 4) if positions else 0.0,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }
