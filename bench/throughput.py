"""Training throughput: `studio train` against the plain script (bench/baseline_peft.py) on the same job.

Same model (the bundled one), data (studio-facts), hyperparameters (LoRA r16/alpha 32/dropout 0.05 on all
linear layers, batch 4, cutoff 256, lr 2e-4 cosine, no warmup, AdamW, fp32, seed 42) and step count, each
in a fresh process, alternating so machine noise hits every variant alike:

- studio: `studio train CONFIG` through the real worker process, the SQLite store and its logging
  (every step logged: the most store writes a run can make), under the allocator the worker picks.
- baseline: the plain script under the system allocator, as a user would run it.
- baseline+alloc: the same script with the worker's allocator preloaded, so studio/baseline+alloc isolates
  what the studio itself costs (store, logging, worker) from what its allocator choice gains.

tokens/s = real (non-padding) tokens / the Trainer's train_runtime (model loading and start-up excluded,
reported separately as wall time). Peak memory is each training process's ru_maxrss. Medians of the repeats;
each repeat starts with a different variant, after one untimed warm-up run.
Goals (issue 6): studio >= 0.97x the baseline in tokens/s, peak memory <= 1.05x, both judged like for like
(against baseline+alloc); the ratio to the plain baseline is the headline a user gets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, median, studio_env, table, verdict, write_result

STEPS, BATCH, CUTOFF = 20, 4, 256
HPARAMS = {"lr": 2e-4, "r": 16, "alpha": 32, "dropout": 0.05, "seed": 42}


def studio_config(steps: int) -> dict:
    return {
        "model": {"source": "bundled"},
        "lora": {"r": HPARAMS["r"], "alpha": HPARAMS["alpha"], "dropout": HPARAMS["dropout"]},
        "data": {"datasets": ["studio-facts"], "cutoff_len": CUTOFF},
        "train": {
            "max_steps": steps,
            "batch_size": BATCH,
            "grad_accum": 1,
            "learning_rate": HPARAMS["lr"],
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "save_steps": 100000,
            "optimizer": "adamw_torch",
            "compute_type": "fp32",
            "seed": HPARAMS["seed"],
            "device": "cpu",
        },
    }


def run_studio(tmp: Path, run_config: dict) -> dict:
    """`studio train` on this config in a fresh STUDIO_HOME; what run.json and the store say about it."""
    import yaml

    from studio.core.store import Store

    home = Path(tempfile.mkdtemp(dir=tmp, prefix="studio-"))
    config = home / "bench.yaml"
    config.write_text(yaml.safe_dump(run_config))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "studio.cli", "train", str(config)],
        env=studio_env(home),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"studio train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    (run,) = Store(home / "studio.db").list_runs()
    body = json.loads((Path(run.adapter_dir) / "run.json").read_text())
    points = [m for m in Store(home / "studio.db").metrics(run.id) if m.loss is not None]
    keys = ("train_runtime_s", "real_tokens", "tokens_per_s", "padding_share", "peak_memory_mb", "global_step")
    return {
        **{k: body[k] for k in keys},
        "wall_s": wall,
        "losses": [m.loss for m in points],
        "epochs": [m.epoch for m in points],
    }


def run_baseline(tmp: Path, steps: int, preload: bool) -> dict:
    from studio.core.allocator import child_env
    from studio.model.loading import resolve_model

    home = Path(tempfile.mkdtemp(dir=tmp, prefix="baseline-"))
    out = home / "result.json"
    env = studio_env(home)
    env.pop("LD_PRELOAD", None)
    if preload:
        env = child_env(env)
    cmd = [
        sys.executable,
        str(REPO / "bench" / "baseline_peft.py"),
        "--model", resolve_model("bundled").path,
        "--data", str(REPO / "datasets" / "studio_facts.json"),
        "--out", str(out),
        "--steps", str(steps),
        "--batch", str(BATCH),
        "--cutoff", str(CUTOFF),
        *(x for k, v in HPARAMS.items() for x in (f"--{k}", str(v))),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"baseline failed:\n{proc.stderr[-3000:]}")
    body = json.loads(out.read_text())
    return {**body, "wall_s": wall}


VARIANTS = {
    "studio": lambda tmp, steps: run_studio(tmp, studio_config(steps)),
    "baseline": lambda tmp, steps: run_baseline(tmp, steps, preload=False),
    "baseline+alloc": lambda tmp, steps: run_baseline(tmp, steps, preload=True),
}


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, rs in runs.items():
        out[name] = {
            key: median(r[key] for r in rs)
            for key in ("tokens_per_s", "train_runtime_s", "peak_memory_mb", "wall_s", "real_tokens", "padding_share")
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.throughput")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=STEPS)
    args = p.parse_args(argv if argv is not None else (sys.argv[1:] if __name__ == "__main__" else []))

    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        # An untimed warm-up (page cache, CPU clocks), then each repeat starts with another variant, so no
        # variant always runs first.
        run_baseline(Path(tmp), 3, preload=False)
        names = list(VARIANTS)
        for i in range(args.repeats):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                runs[name].append(VARIANTS[name](Path(tmp), args.steps))
                r = runs[name][-1]
                print(f"  repeat {i + 1} {name:15} {r['tokens_per_s']:7.0f} tok/s  {r['peak_memory_mb']:6.0f} MiB")
    med = summarize(runs)
    s, b, ba = med["studio"], med["baseline"], med["baseline+alloc"]
    ratios = {
        "tokens_per_s studio/baseline": s["tokens_per_s"] / b["tokens_per_s"],
        "tokens_per_s studio/baseline+alloc": s["tokens_per_s"] / ba["tokens_per_s"],
        "peak_memory studio/baseline": s["peak_memory_mb"] / b["peak_memory_mb"],
        "peak_memory studio/baseline+alloc": s["peak_memory_mb"] / ba["peak_memory_mb"],
    }
    goals = {
        "tokens/s >= 0.97x baseline (like for like)": ratios["tokens_per_s studio/baseline+alloc"] >= 0.97,
        "tokens/s >= 0.97x plain baseline": ratios["tokens_per_s studio/baseline"] >= 0.97,
        "peak memory <= 1.05x baseline (like for like)": ratios["peak_memory studio/baseline+alloc"] <= 1.05,
        "peak memory <= 1.05x plain baseline": ratios["peak_memory studio/baseline"] <= 1.05,
    }
    path = write_result(
        "throughput",
        {
            "what": __doc__.split("\n\n")[0],
            "config": {"steps": args.steps, "batch": BATCH, "cutoff": CUTOFF, **HPARAMS, "model": "bundled",
                       "data": "studio-facts", "compute_type": "fp32", "repeats": args.repeats},
            "medians": med,
            "ratios": {k: round(v, 3) for k, v in ratios.items()},
            "goals": goals,
            "runs": runs,
        },
    )  # fmt: skip
    rows = [
        [
            name,
            f"{m['tokens_per_s']:.0f}",
            f"{m['train_runtime_s']:.1f}",
            f"{m['peak_memory_mb']:.0f}",
            f"{m['wall_s']:.1f}",
        ]
        for name, m in med.items()
    ]
    print(table(rows, ["variant", "tok/s", "train s", "peak MiB", "wall s"]))
    for k, v in ratios.items():
        print(f"{k:38} {v:.3f}")
    for k, ok in goals.items():
        print(f"{k:48} {verdict(ok)}")
    print(f"written {path}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
