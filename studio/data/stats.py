"""Token-length statistics: what the cutoff length choice costs in truncated examples."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenStats:
    rows: int
    min: int
    median: float
    p95: int  # nearest-rank 95th percentile: a length that really occurs
    max: int
    mean: float
    truncated_share: float  # share of rows longer than cutoff_len, 0..1
    cutoff_len: int

    def summary(self) -> str:
        return (
            f"{self.rows} examples, tokens min {self.min} / median {self.median:g} / p95 {self.p95} / "
            f"max {self.max}; {self.truncated_share:.0%} longer than the cutoff {self.cutoff_len}."
        )


def token_stats(lengths: list[int], cutoff_len: int) -> TokenStats:
    if not lengths:
        return TokenStats(0, 0, 0.0, 0, 0, 0.0, 0.0, cutoff_len)
    ordered = sorted(lengths)
    n = len(ordered)
    return TokenStats(
        rows=n,
        min=ordered[0],
        median=float(statistics.median(ordered)),
        p95=ordered[max(0, math.ceil(0.95 * n) - 1)],
        max=ordered[-1],
        mean=sum(ordered) / n,
        truncated_share=sum(1 for x in ordered if x > cutoff_len) / n,
        cutoff_len=cutoff_len,
    )


def histogram(lengths: list[int], bins: int = 20) -> list[tuple[float, float, int]]:
    """Equal-width bins (low, high, count) from min to max; the last bin includes the max."""
    if not lengths:
        return []
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    low, high = min(lengths), max(lengths)
    if low == high:
        return [(float(low), float(high), len(lengths))]
    width = (high - low) / bins
    counts = [0] * bins
    for x in lengths:
        counts[min(int((x - low) / width), bins - 1)] += 1
    return [(low + i * width, low + (i + 1) * width, counts[i]) for i in range(bins)]
