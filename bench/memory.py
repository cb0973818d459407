"""Planner vs reality: train the bundled model a few steps under several configs, each in a fresh process,
and compare its peak memory with `studio.planner.plan_memory`.

Measured on CPU: peak RSS (VmHWM) minus the RSS right after `import torch, transformers` in that same
process (so the interpreter, torch and transformers themselves are not counted, everything after is). On
CUDA: torch.cuda.max_memory_allocated (the planner's CUDA-context overhead item is then left out).
Writes bench/results/memory-<device>.json and prints a table. About 4-6 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BATCH, CUTOFF, STEPS = 2, 256, 3
RUNTIME_FLOOR = "runtime-floor"

BASE = {
    "model": {"source": "bundled"},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    # Packing fills each row to the cutoff, so the measured sequence is the one the planner assumes.
    "data": {"datasets": ["studio-facts"], "cutoff_len": CUTOFF, "packing": True},
    "train": {
        "max_steps": STEPS,
        "batch_size": BATCH,
        "grad_accum": 1,
        "logging_steps": 1,
        "save_steps": 1000,
        "warmup_ratio": 0.0,
        "optimizer": "adamw_torch",
        "device": "cpu",
        "num_threads": 2,
    },
}
QLORA = {"mode": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"}
CONFIGS: dict[str, dict] = {
    # A 2-layer hidden-64 Llama: its tensors are a few MB, so what it measures is the runtime itself.
    RUNTIME_FLOOR: {"model": {"source": "<tiny>"}, "train": {"compute_type": "fp32"}},
    "lora-fp32": {"train": {"compute_type": "fp32"}},
    "lora-bf16": {"train": {"compute_type": "bf16"}},
    "qlora-nf4": {"quant": QLORA, "train": {"compute_type": "bf16"}},
    "lora-fp32-ckpt": {"train": {"compute_type": "fp32", "gradient_checkpointing": True}},
    "qlora-nf4-ckpt": {"quant": QLORA, "train": {"compute_type": "bf16", "gradient_checkpointing": True}},
}


def run_config(name: str, tiny_dir: str):
    from studio.config import RunConfig, merge_dicts

    cfg = merge_dicts(BASE, CONFIGS[name])
    if cfg["model"]["source"] == "<tiny>":
        cfg["model"]["source"] = tiny_dir
    return RunConfig.from_dict(cfg).check()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class NullSink:
    def log(self, step, **values):
        pass

    def event(self, message, level="info"):
        pass

    def progress(self, step, total):
        pass


def child(name: str, tiny_dir: str, out: Path) -> None:
    """One config in this (fresh) process: baseline after the heavy imports, then train, then peak."""
    import gc

    import torch
    import transformers  # noqa: F401

    gc.collect()
    baseline = _status_kb("VmRSS")
    cuda = torch.cuda.is_available()
    cfg = run_config(name, tiny_dir)
    if cuda:
        from studio.config import merge_dicts, RunConfig  # noqa: I001

        cfg = RunConfig.from_dict(merge_dicts(cfg.to_dict(), {"train": {"device": "cuda", "num_threads": None}}))
    from studio.train import run_training

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_training(cfg, Path(tmp) / "run", NullSink(), home=Path(tmp) / "home")
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") - baseline
    out.write_text(
        json.dumps(
            {
                "measured_bytes": peak,
                "baseline_rss_bytes": baseline,
                "steps": result.global_step,
                "seconds": round(time.perf_counter() - started, 1),
                "device": "cuda" if cuda else "cpu",
            }
        )
    )


def make_tiny_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from studio.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("bundled").path)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def estimate(name: str, tiny_dir: str, device: str):
    from studio.models import load_config, resolve_model
    from studio.planner import plan_memory

    cfg = run_config(name, tiny_dir)
    model_config = load_config(resolve_model(cfg.model.source))
    plan = plan_memory(model_config, cfg, device)
    if device == "cuda":  # max_memory_allocated does not see the CUDA context
        plan = type(plan)(plan.device, tuple(i for i in plan.items if i.name != "overhead"), *_rest(plan))
    return plan


def _rest(plan):
    return plan.trainable_params, plan.tokens_per_step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--tiny", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--only", nargs="*", help="config names (default: all)")
    args = p.parse_args(argv if argv is not None else (sys.argv[1:] if __name__ == "__main__" else []))
    os.environ.setdefault("STUDIO_MODEL_CACHE", str(Path.home() / ".cache" / "lora-studio" / "models"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.one:
        child(args.one, args.tiny, Path(args.out))
        return 0

    import torch
    import transformers

    names = args.only or list(CONFIGS)
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(make_tiny_model(Path(tmp) / "tiny"))
        for name in names:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-m", "bench.memory", "--one", name, "--tiny", tiny, "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
            if proc.returncode != 0 or not out.exists():
                print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                failed += 1
                continue
            measured = json.loads(out.read_text())
            plan = estimate(name, tiny, measured["device"])
            ratio = plan.total_bytes / measured["measured_bytes"]
            rows.append(
                {
                    "config": name,
                    "run_config": run_config(name, tiny).to_dict(),
                    "estimate": {
                        "total_bytes": plan.total_bytes,
                        "items": {i.name: {"bytes": i.bytes, "why": i.why} for i in plan.items},
                    },
                    **measured,
                    "ratio": round(ratio, 3),
                    "within_25pct": 0.75 <= ratio <= 1.25,
                    "calibration": name == RUNTIME_FLOOR,
                    # For the floor: what the runtime itself holds = measured minus the planner's tensor items.
                    "implied_runtime_bytes": measured["measured_bytes"]
                    - sum(i.bytes for i in plan.items if i.name != "overhead"),
                }
            )
    device = rows[0]["device"] if rows else "cpu"
    report = {
        "what": "planner estimate vs measured peak memory, bundled model, "
        f"batch {BATCH} x cutoff {CUTOFF} (packed), {STEPS} steps, LoRA r16 all-linear, adamw_torch",
        "measured": "CPU: peak RSS (VmHWM) minus RSS after `import torch, transformers` in a fresh process; "
        "CUDA: torch.cuda.max_memory_allocated",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, **_versions()},
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"memory-{device}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"written {path}")
    checked = [r for r in rows if not r["calibration"]]
    return 1 if failed or not all(r["within_25pct"] for r in checked) else 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("peft", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'config':16} {'estimate':>10} {'measured':>10} {'ratio':>6}  within 25%   biggest items (estimate)"]
    for r in rows:
        items = sorted(r["estimate"]["items"].items(), key=lambda kv: -kv[1]["bytes"])[:3]
        big = ", ".join(f"{k} {v['bytes'] / 2**20:.0f}" for k, v in items)
        ok = "(calibration)" if r["calibration"] else ("yes" if r["within_25pct"] else "NO")
        lines.append(
            f"{r['config']:16} {r['estimate']['total_bytes'] / 2**20:>8.0f}Mi {r['measured_bytes'] / 2**20:>8.0f}Mi "
            f"{r['ratio']:>6.2f}  {ok:11} {big} (MiB)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
