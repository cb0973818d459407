"""Token statistics and histogram."""

from __future__ import annotations

from studio.data import TokenStats, histogram, token_stats


def test_token_stats_exact_values():
    lengths = list(range(1, 21))  # 1..20
    assert token_stats(lengths, cutoff_len=15) == TokenStats(
        rows=20, min=1, median=10.5, p95=19, max=20, mean=10.5, truncated_share=0.25, cutoff_len=15
    )


def test_token_stats_empty():
    assert token_stats([], 8) == TokenStats(0, 0, 0.0, 0, 0, 0.0, 0.0, 8)


def test_histogram_bins_cover_min_to_max():
    assert histogram([0, 1, 2, 3, 4, 10], bins=5) == [
        (0.0, 2.0, 2),
        (2.0, 4.0, 2),
        (4.0, 6.0, 1),
        (6.0, 8.0, 0),
        (8.0, 10.0, 1),
    ]
    assert histogram([7, 7, 7]) == [(7.0, 7.0, 3)]
    assert histogram([]) == []
