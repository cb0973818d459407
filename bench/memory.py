"""Planner vs reality: train the bundled model a few steps under several configs, each in a fresh process,
and compare its peak memory with `studio.model.memory.plan_memory`.

Measured on CPU: peak RSS (VmHWM) minus the RSS right after `import torch, transformers` in that same
process (so the interpreter, torch and transformers themselves are not counted, everything after is). The
child marks phases (setup, load, prepare, get_peft_model, each step's forward and backward+optimizer): at
each boundary it reads VmHWM (the exact peak of the phase that ends) and resets it through
/proc/self/clear_refs, while a thread samples VmRSS/RssAnon/RssFile every 20 ms (anon vs file pages at the
peak). During step 1's forward a saved_tensors_hooks probe counts what autograd keeps for backward. On
CUDA: torch.cuda.max_memory_allocated (the planner's CUDA-context overhead item is then left out).
Writes bench/results/memory-<device>.json and prints a table. About 1.5 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BATCH, CUTOFF, STEPS = 2, 256, 2
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
    from studio.core.config import RunConfig, merge_dicts

    cfg = merge_dicts(BASE, CONFIGS[name])
    if cfg["model"]["source"] == "<tiny>":
        cfg["model"]["source"] = tiny_dir
    return RunConfig.from_dict(cfg).check()


class NullSink:
    def log(self, step, **values):
        pass

    def event(self, message, level="info"):
        pass

    def progress(self, step, total):
        pass


_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in _FIELDS:
            out[key] = int(line.split()[1]) * 1024
    return out


class PhaseProbe:
    """Peak memory per phase of one run, in the process itself.

    At each phase boundary the kernel's high-water mark (VmHWM) is read (the exact peak of the phase that
    ends) and reset (`echo 5 > /proc/self/clear_refs`); a background thread samples VmRSS, RssAnon and
    RssFile every `interval` s, so each phase also says how much of its peak was anonymous memory (tensors,
    heap) and how much file pages (a mapped safetensors file). Bytes are relative to `baseline`.
    """

    def __init__(self, baseline: dict[str, int], interval: float = 0.02):
        import threading

        self.baseline = baseline
        self.interval = interval
        self.phases: list[dict] = []
        self.saved: dict = {}
        self._name = "setup"
        self._t0 = time.perf_counter()
        self._samples: list[tuple[int, int, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._reset_hwm()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            s = _status()
            with self._lock:
                self._samples.append((s["VmRSS"], s["RssAnon"], s["RssFile"]))

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def mark(self, name: str) -> None:
        s = _status()
        with self._lock:
            samples, self._samples = [*self._samples, (s["VmRSS"], s["RssAnon"], s["RssFile"])], []
        top = max(samples)  # the sample with the highest RSS: how that peak splits into anon and file pages
        b = self.baseline
        self.phases.append(
            {
                "phase": self._name,
                "peak_bytes": s["VmHWM"] - b["VmRSS"],
                "sampled_peak": {
                    "rss": top[0] - b["VmRSS"],
                    "anon": top[1] - b["RssAnon"],
                    "file": top[2] - b["RssFile"],
                },
                "max_anon_bytes": max(x[1] for x in samples) - b["RssAnon"],
                "max_file_bytes": max(x[2] for x in samples) - b["RssFile"],
                "end_bytes": s["VmRSS"] - b["VmRSS"],
                "seconds": round(time.perf_counter() - self._t0, 2),
            }
        )
        self._name, self._t0 = name, time.perf_counter()
        self._reset_hwm()

    def finish(self) -> list[dict]:
        self.mark("")
        self._stop.set()
        self._thread.join()
        return self.phases


@contextlib.contextmanager
def saved_tensors(model):
    """What autograd keeps for backward during one forward (activations, logits), parameters left out:
    distinct storages, total bytes and the largest groups by (shape, dtype)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[tuple[int, ...], str, int]] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), (tuple(t.shape), str(t.dtype).removeprefix("torch."), st.nbytes()))
        return t

    summary: dict = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield summary
    groups: dict[str, list[int]] = {}
    for shape, dtype, nbytes in seen.values():
        g = groups.setdefault(f"{list(shape)} {dtype}", [0, 0])
        g[0], g[1] = g[0] + 1, g[1] + nbytes
    summary["total_bytes"] = sum(n for _, _, n in seen.values())
    summary["groups"] = {
        k: {"count": c, "bytes": b} for k, (c, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:12]
    }


def _instrument(probe: PhaseProbe) -> None:
    """Phase marks around what run_training calls, without touching studio.training.loop: load, prepare, LoRA, steps."""
    import peft
    import transformers

    import studio.training.loop as train

    def around(fn, before: str, after: str | None = None):
        def wrapped(*args, **kwargs):
            probe.mark(before)
            out = fn(*args, **kwargs)
            if after:
                probe.mark(after)
            return out

        return wrapped

    train.load_model = around(train.load_model, "load", "after load")
    peft.prepare_model_for_kbit_training = around(peft.prepare_model_for_kbit_training, "prepare kbit")
    peft.get_peft_model = around(peft.get_peft_model, "get_peft_model", "trainer setup")
    trainer = transformers.Trainer
    step, compute_loss = trainer.training_step, trainer.compute_loss
    counter = {"step": 0}

    def training_step(self, *args, **kwargs):
        counter["step"] += 1
        return step(self, *args, **kwargs)

    def loss(self, *args, **kwargs):
        probe.mark(f"step {counter['step']} forward")
        if counter["step"] == 1:
            with saved_tensors(self.model) as saved:
                out = compute_loss(self, *args, **kwargs)
            probe.saved = saved
        else:
            out = compute_loss(self, *args, **kwargs)
        probe.mark(f"step {counter['step']} backward+optimizer")
        return out

    trainer.training_step, trainer.compute_loss = training_step, loss
    trainer.train = around(trainer.train, "train start", "save adapter")


def child(name: str, tiny_dir: str, out: Path) -> None:
    """One config in this (fresh) process: baseline after the heavy imports, then train, with per-phase peaks."""
    import gc

    import torch
    import transformers  # noqa: F401

    gc.collect()
    baseline = _status()
    cuda = torch.cuda.is_available()
    cfg = run_config(name, tiny_dir)
    if cuda:
        from studio.core.config import merge_dicts, RunConfig  # noqa: I001

        cfg = RunConfig.from_dict(merge_dicts(cfg.to_dict(), {"train": {"device": "cuda", "num_threads": None}}))
    probe = PhaseProbe(baseline)
    from studio.core.allocator import loaded_allocator
    from studio.training.loop import run_training

    _instrument(probe)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_training(cfg, Path(tmp) / "run", NullSink(), home=Path(tmp) / "home")
    phases = probe.finish()
    peak = torch.cuda.max_memory_allocated() if cuda else max(p["peak_bytes"] for p in phases)
    out.write_text(
        json.dumps(
            {
                "measured_bytes": peak,
                "baseline_rss_bytes": baseline["VmRSS"],
                "phases": phases,
                "saved_for_backward_step1": probe.saved,
                "steps": result.global_step,
                "seconds": round(time.perf_counter() - started, 1),
                "allocator": loaded_allocator(),
                "device": "cuda" if cuda else "cpu",
            }
        )
    )


def make_tiny_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from studio.model.loading import resolve_model

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
    from studio.model.loading import load_config, resolve_model
    from studio.model.memory import plan_memory

    cfg = run_config(name, tiny_dir)
    model_config = load_config(resolve_model(cfg.model.source))
    plan = plan_memory(model_config, cfg, device)
    if device == "cuda":  # max_memory_allocated does not see the CUDA context
        plan = dataclasses.replace(plan, items=tuple(i for i in plan.items if i.name != "overhead"))
    return plan


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

    from studio.core.allocator import child_env, choose_allocator

    allocator = choose_allocator()
    names = args.only or list(CONFIGS)
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(make_tiny_model(Path(tmp) / "tiny"))
        for name in names:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-m", "bench.memory", "--one", name, "--tiny", tiny, "--out", str(out)]
            # The worker's environment, so the child runs under the allocator a studio run gets.
            env = child_env(os.environ, allocator)
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent, env=env)
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
                        "training_bytes": plan.training_bytes,
                        "loading_bytes": plan.loading_bytes,
                        "items": {i.name: {"bytes": i.bytes, "why": i.why} for i in plan.items},
                        "load_items": {i.name: {"bytes": i.bytes, "why": i.why} for i in plan.load_items},
                    },
                    **measured,
                    "measured_loading_bytes": phase_peak(measured, LOAD_PHASES),
                    "measured_training_bytes": phase_peak(measured, ("step",)),
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
        "allocator": allocator.describe,
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"memory-{device}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"allocator: {allocator.describe}\nwritten {path}")
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


LOAD_PHASES = ("load", "after load", "prepare kbit")


def phase_peak(measured: dict, prefixes: tuple[str, ...]) -> int:
    """The highest peak among the phases whose name starts with one of `prefixes` (0: none)."""
    peaks = [p["peak_bytes"] for p in measured.get("phases", []) if p["phase"].startswith(prefixes)]
    return max(peaks, default=0)


def table(rows: list[dict]) -> str:
    """MiB; load/train: the estimate's loading and training peaks, then the measured ones (phases)."""
    head = f"{'config':16} {'estimate':>8} {'measured':>8} {'ratio':>6}  {'within 25%':13}"
    lines = [head + f"{'est load/train':>15} {'meas load/train':>16}"]
    for r in rows:
        e, mib = r["estimate"], 2**20
        ok = "(calibration)" if r["calibration"] else ("yes" if r["within_25pct"] else "NO")
        lines.append(
            f"{r['config']:16} {e['total_bytes'] / mib:>8.0f} {r['measured_bytes'] / mib:>8.0f} {r['ratio']:>6.2f}  "
            f"{ok:13}{e['loading_bytes'] / mib:>7.0f}/{e['training_bytes'] / mib:<7.0f} "
            f"{r['measured_loading_bytes'] / mib:>8.0f}/{r['measured_training_bytes'] / mib:<7.0f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
