"""Packing and padding: real (non-padding) tokens per second of `studio train` on the bundled variable-length
sample (studio-facts + studio-chats: 102 conversations of 43-113 tokens), in three batching modes:

- naive: every sample padded to the cutoff (256), batches of 16 (data.pad_to_cutoff); run for 4 steps only,
  for its speed (2 epochs would take 3.5 minutes here);
- padding: random batches of 16 samples, each batch padded to its longest sample (dynamic padding: the
  studio's default and what a plain Trainer script with DataCollatorForSeq2Seq does);
- packing: whole samples packed first-fit into rows of 256 tokens, 4 rows a batch (about the same real
  tokens per optimizer step as 16 samples), positions reset per sample and attention kept inside each
  sample (transformers builds a block-diagonal mask from the position ids for sdpa and eager attention;
  flash-attention-2 uses them as sequence boundaries; tests/unit/test_train_batches.py checks there is no
  cross-talk).

padding and packing train 2 epochs (so both see the same tokens) in fresh processes; a second padding run
with another seed gives the seed-to-seed noise of the loss. Loss curves are compared by epoch quarters
(mean logged loss per quarter). Goals (issue 6): packing >= 1.5x naive padding in real tokens/s, with the
same loss curve as padding within noise (each quarter within 2x the seed-to-seed difference, or 0.05,
whichever is larger). Packing against dynamic padding is reported too: its bound here is 1/(1 - padding
share), since both modes cost about the same per position.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.common import table, verdict, write_result
from bench.throughput import run_studio

EPOCHS, CUTOFF = 2, 256
PAD_BATCH, PACK_BATCH = 16, 4
QUARTERS = 4
NAIVE_STEPS = 4


def mode_config(mode: str, seed: int = 42) -> dict:
    packed, naive = mode == "packing", mode == "naive"
    return {
        "model": {"source": "bundled"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "data": {
            "datasets": ["studio-facts", "studio-chats"],
            "cutoff_len": CUTOFF,
            "packing": packed,
            "pad_to_cutoff": naive,
        },
        "train": {
            "epochs": EPOCHS,
            "max_steps": NAIVE_STEPS if naive else 0,
            "batch_size": PACK_BATCH if packed else PAD_BATCH,
            "grad_accum": 1,
            "learning_rate": 2e-4,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "save_steps": 100000,
            "optimizer": "adamw_torch",
            "compute_type": "fp32",
            "seed": seed,
            "device": "cpu",
        },
    }


def quarter_means(run: dict, quarters: int = QUARTERS) -> list[float | None]:
    """Mean logged loss in each quarter of the training (by epoch fraction)."""
    bins: list[list[float]] = [[] for _ in range(quarters)]
    for loss, epoch in zip(run["losses"], run["epochs"], strict=True):
        i = min(quarters - 1, int(epoch / EPOCHS * quarters - 1e-9)) if epoch else 0
        bins[i].append(loss)
    return [round(sum(b) / len(b), 4) if b else None for b in bins]


def max_gap(a: list[float | None], b: list[float | None]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True) if x is not None and y is not None)


RUNS = (("padding", 42), ("packing", 42), ("naive", 42), ("padding", 7))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.packing")
    p.parse_args(argv if argv is not None else (sys.argv[1:] if __name__ == "__main__" else []))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, seed in RUNS:
            key = mode if seed == 42 else f"{mode} (seed {seed})"
            results[key] = run_studio(Path(tmp), mode_config(mode, seed))
            r = results[key]
            print(f"  {key:18} {r['tokens_per_s']:7.0f} tok/s  padding {100 * r['padding_share']:4.1f}%")
    curves = {k: quarter_means(r) for k, r in results.items()}
    noise = max_gap(curves["padding"], curves["padding (seed 7)"])
    tolerance = max(2 * noise, 0.05)
    base = results["padding"]["tokens_per_s"]
    speedup = {k: r["tokens_per_s"] / base for k, r in results.items()}
    vs_naive = results["packing"]["tokens_per_s"] / results["naive"]["tokens_per_s"]
    gaps = {"packing": max_gap(curves["packing"], curves["padding"])}
    goals = {
        "packing >= 1.5x naive padding (real tokens/s)": vs_naive >= 1.5,
        "packing loss curve within noise": gaps["packing"] <= tolerance,
    }
    path = write_result(
        "packing",
        {
            "what": __doc__.split("\n\n")[0],
            "config": {k: mode_config(k) for k in ("naive", "padding", "packing")},
            "packing_vs_naive": round(vs_naive, 3),
            "packing_vs_dynamic_padding": round(speedup["packing"], 3),
            "results": {
                k: {
                    "tokens_per_s": r["tokens_per_s"],
                    "speedup_vs_padding": round(speedup[k], 3),
                    "padding_share": r["padding_share"],
                    "real_tokens": r["real_tokens"],
                    "train_runtime_s": r["train_runtime_s"],
                    "optimizer_steps": r["global_step"],
                    "loss_by_quarter": curves[k],
                    "losses": r["losses"],
                }
                for k, r in results.items()
            },
            "loss_noise_seed_to_seed": round(noise, 4),
            "loss_tolerance": round(tolerance, 4),
            "loss_gap_vs_padding": {k: round(v, 4) for k, v in gaps.items()},
            "goals": goals,
        },
    )
    rows = [
        [
            k,
            f"{r['tokens_per_s']:.0f}",
            f"{speedup[k]:.2f}x",
            f"{100 * r['padding_share']:.1f}%",
            str(r["global_step"]),
            " ".join(f"{x:.2f}" for x in curves[k] if x is not None),
        ]
        for k, r in results.items()
    ]
    print(table(rows, ["mode", "real tok/s", "vs padding", "padding", "steps", "loss by quarter"]))
    print(f"packing vs naive padding {vs_naive:.2f}x, vs dynamic padding {speedup['packing']:.2f}x")
    print(f"seed-to-seed loss noise {noise:.3f}; tolerance {tolerance:.3f}; gaps {gaps}")
    for k, ok in goals.items():
        print(f"{k:42} {verdict(ok)}")
    print(f"written {path}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
