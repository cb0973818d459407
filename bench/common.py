"""What every bench module shares: where results go, machine and version info, medians, a studio
environment for child processes, a plain-text table, and the process/browser harness (free port, waiting
for a page, ending a process tree, headless Chromium) that the browser tests use too.

A bench module exposes `main(argv=None) -> int`: 0 when its goals are met, 1 when one is missed (it still
writes its JSON). `python -m bench` runs them all (see bench/__main__.py).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MODEL_CACHE = Path.home() / ".cache" / "lora-studio" / "models"
# The bench's own model lookups share the converted-model cache with the tests, offline.
os.environ.setdefault("STUDIO_MODEL_CACHE", str(MODEL_CACHE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "gradio", "lora-studio"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    from studio.core.allocator import choose_allocator

    out["worker allocator"] = choose_allocator().describe
    return out


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of a small sample."""
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def studio_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for a studio child process: its own STUDIO_HOME, the shared converted-model cache,
    offline, no tokenizer thread pools."""
    env = dict(
        os.environ,
        STUDIO_HOME=str(home),
        STUDIO_MODEL_CACHE=os.environ.get("STUDIO_MODEL_CACHE", str(MODEL_CACHE)),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        GRADIO_ANALYTICS_ENABLED="False",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def write_result(name: str, body: dict[str, Any]) -> Path:
    """bench/results/<name>.json: the module's figures plus when, where and with what they were taken."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    report = {
        "bench": name,
        "taken": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "versions": versions(),
        **body,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Rows of already formatted cells, left-aligned first column, the rest right-aligned."""
    cells = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        parts = [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]
        lines.append("  ".join(parts))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# -- processes and the browser ---------------------------------------------------------------------------

# Debian's Chromium, driven by Playwright (never `playwright install`: it downloads a browser).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_in_session(cmd: Sequence[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `cmd` in the repo root in its own session (so kill_tree ends it with its children), stdout and
    stderr appended to `log_path`."""
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            list(cmd),
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def choose(page, elem_id: str, text: str) -> None:
    """Pick an option of a gradio 6 dropdown in a Playwright page: click its combobox, type, click the option."""
    box = page.locator(f"#{elem_id} input[role=combobox]")
    box.click()
    box.fill(text)
    page.get_by_role("option", name=text).first.click()
    page.keyboard.press("Escape")


def wait_http(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Until `url` answers 200; fails early when `proc` (the server) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def kill_tree(pid: int) -> None:
    """End a process started in its own session and everything in that session (SIGTERM, then SIGKILL)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        if sig == signal.SIGTERM:
            for _ in range(50):
                if not alive(pid):
                    return
                time.sleep(0.1)


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
