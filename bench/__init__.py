"""Benchmarks: each module has `main() -> int` and writes its results as JSON under bench/results/."""
