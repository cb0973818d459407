"""Start-up: seconds from process start to the first HTTP 200 of the page, for `studio serve` and for `make run`
on an installed tree, and proof that the page does not wait for a model to load.

How: each command is started `--repeats` times (default 3, the two commands alternating) in its own session, on a
free port, with a fresh temporary STUDIO_HOME and the shared converted-model cache (bench.common.studio_env);
`/` is polled every 20 ms from the moment the process is started until it answers 200, then gradio's `/config`
(the page's first request after the HTML). `make run` only checks its install stamp and then runs the same server
as a child of make, so its figure is the serve figure plus make's own start. Once the page has answered, every
process in the server's session is inspected: the sum of VmRSS from /proc/<pid>/status, and /proc/<pid>/maps
searched for model weight files (.safetensors, .gguf, .bin/.pt under a models folder): `model_mapped` says whether
any weights are mapped at that moment (`torch_loaded` says whether libtorch is: code, not weights). The session is
then killed as a whole. With the browser check (on unless --no-browser), one more `studio serve` is opened in
headless Chromium: the time until the page's tabs are rendered and, with the Train tab open, until its load events
(model layers, parameter count, memory plan, all from a weightless skeleton) have filled the memory estimate; and
whether any weights are mapped after that.

Goal (from the issue): the page must not wait for any model to load; both figures are reported. Writes
bench/results/startup.json and prints a table; about a minute on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import (
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    free_port,
    median,
    spawn_in_session,
    studio_env,
    table,
    verdict,
    write_result,
)

POLL_S = 0.02
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


COMMANDS = {
    "studio serve": lambda port: [python(), "-m", "studio.cli", "serve", "--port", str(port)],
    "make run": lambda port: ["make", "--no-print-directory", "run", f"PORT={port}"],
}


def first_200(url: str, t0: float, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds from t0 (perf_counter at process start) to the first 200 answer of url."""
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                resp.read()
                if resp.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(POLL_S)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def session_pids(sid: int) -> list[int]:
    """Live processes whose session is `sid` (the server started with start_new_session: sid = its pid)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after ")": state, ppid, pgrp, session
            out.append(int(entry.name))
    return sorted(out)


def inspect(sid: int) -> dict[str, Any]:
    """RSS of every process in the session, the model weight files any of them maps, and whether torch is loaded."""
    procs, mapped, torch_loaded = [], set(), False
    for pid in session_pids(sid):
        try:
            status = (Path("/proc") / str(pid) / "status").read_text()
            maps = (Path("/proc") / str(pid) / "maps").read_text()
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS")), 0)
        procs.append({"pid": pid, "cmd": cmdline[:120], "rss_bytes": rss})
        torch_loaded = torch_loaded or "/libtorch_cpu" in maps
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[5] if len(line.split(maxsplit=5)) == 6 else ""
            weights = path.endswith(WEIGHT_SUFFIXES) or ("/models/" in path and path.endswith((".bin", ".pt", ".pth")))
            if weights:
                mapped.add(path)
    return {
        "rss_bytes": sum(p["rss_bytes"] for p in procs),
        "processes": procs,
        "model_mapped": bool(mapped),
        "mapped_weight_files": sorted(mapped),
        "torch_loaded": torch_loaded,
    }


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the whole session, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        if not session_pids(proc.pid):
            return


def start(name: str, tmp: Path, tag: str) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    home = tmp / f"home-{tag}"
    t0 = time.perf_counter()
    proc = spawn_in_session(COMMANDS[name](port), studio_env(home), tmp / f"{tag}.log")
    return proc, f"http://127.0.0.1:{port}/", t0


def one(name: str, tmp: Path, tag: str, timeout: float) -> dict[str, Any]:
    proc, url, t0 = start(name, tmp, tag)
    try:
        page_s = first_200(url, t0, proc, timeout)
        config_s = first_200(url + "config", t0, proc, timeout)
        seen = inspect(proc.pid)
    except (RuntimeError, TimeoutError) as err:
        raise RuntimeError(f"{err}\n{(tmp / f'{tag}.log').read_text(errors='replace')[-2000:]}") from err
    finally:
        stop(proc)
    return {"page_s": round(page_s, 3), "config_s": round(config_s, 3), **seen}


def browser_check(tmp: Path, timeout: float) -> dict[str, Any]:
    """One `studio serve` opened in Chromium: Start rendered, the Train tab's load events done, weights mapped?"""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.set_default_timeout(timeout * 1000)
            proc, url, t0 = start("studio serve", tmp, "browser")
            try:
                page_s = first_200(url, t0, proc, timeout)
                page.goto(url)
                train_tab = page.get_by_role("tab", name="Train")
                train_tab.wait_for(state="visible")
                rendered_s = time.perf_counter() - t0
                train_tab.click()
                page.wait_for_selector("#train-start", state="visible")
                page.wait_for_function(
                    "() => { const t = document.querySelector('#train-plan')?.innerText || '';"
                    " return t.includes('Memory estimate') && !t.includes('reading the model'); }"
                )
                loaded_s = time.perf_counter() - t0
                seen = inspect(proc.pid)
            finally:
                stop(proc)
        finally:
            browser.close()
    return {
        "page_s": round(page_s, 3),
        "tabs_rendered_s": round(rendered_s, 3),
        "train_tab_loaded_s": round(loaded_s, 3),
        **seen,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="starts per command (default 3)")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for one page (default 60)")
    p.add_argument("--no-browser", dest="browser", action="store_false", help="skip the rendered-page check")
    args = p.parse_args(argv if argv is not None else (sys.argv[1:] if __name__ == "__main__" else []))

    stamp = REPO / ".venv" / ".installed"
    if not stamp.exists():
        print(f"{stamp} is missing: `make run` would install first; run `make install`.", file=sys.stderr)
        return 1
    names = list(COMMANDS)
    raw: dict[str, list[dict]] = {n: [] for n in names}
    browser: dict[str, Any] | None = None
    browser_error: str | None = None
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        for i in range(args.repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                raw[name].append(one(name, Path(tmp), f"{name.replace(' ', '-')}-{i}", args.timeout))
        if args.browser and Path(CHROMIUM).exists():
            from playwright.sync_api import Error as PlaywrightError

            try:
                browser = browser_check(Path(tmp), args.timeout)
            except (PlaywrightError, RuntimeError, TimeoutError) as err:
                print(f"browser check failed: {err}", file=sys.stderr)
                browser_error = str(err)[:2000]

    summary = {
        name: {
            "page_s_median": median(r["page_s"] for r in runs),
            "config_s_median": median(r["config_s"] for r in runs),
            "rss_bytes_median": median(r["rss_bytes"] for r in runs),
            "model_mapped": any(r["model_mapped"] for r in runs),
            "torch_loaded": any(r["torch_loaded"] for r in runs),
        }
        for name, runs in raw.items()
    }
    no_model = not any(s["model_mapped"] for s in summary.values()) and not (browser and browser["model_mapped"])
    goals = {"page without model load": no_model}
    body = {
        "what": "process start -> first HTTP 200 of `/` (and of `/config`) for `studio serve` and `make run` "
        "(installed tree); server RSS and mapped model weights once the page answers",
        "how": f"{args.repeats} starts per command, alternating, fresh STUDIO_HOME each, `/` polled every "
        f"{POLL_S * 1000:.0f} ms; RSS = sum of VmRSS over the server's session; weights = {WEIGHT_SUFFIXES} in "
        "/proc/<pid>/maps",
        "commands": {name: " ".join(COMMANDS[name]("PORT")) for name in names},
        "summary": summary,
        "repeats": raw,
        "browser": browser,
        "browser_error": browser_error,
        "model_mapped": not no_model,
        "goals": goals,
    }
    path = write_result("startup", body)

    mib = 2**20
    rows = []
    for name in names:
        s, runs = summary[name], raw[name]
        rows.append(
            [
                name,
                f"{s['page_s_median']:.2f}",
                " ".join(f"{r['page_s']:.2f}" for r in runs),
                f"{s['config_s_median']:.2f}",
                f"{s['rss_bytes_median'] / mib:.0f}",
                "yes" if s["model_mapped"] else "no",
                "yes" if s["torch_loaded"] else "no",
            ]
        )
    if browser:
        rows.append(
            [
                "studio serve, in Chromium",
                f"{browser['page_s']:.2f}",
                f"tabs {browser['tabs_rendered_s']:.2f}, tab loaded {browser['train_tab_loaded_s']:.2f}",
                "",
                f"{browser['rss_bytes'] / mib:.0f}",
                "yes" if browser["model_mapped"] else "no",
                "yes" if browser["torch_loaded"] else "no",
            ]
        )
    header = ["command", "page s (median)", "repeats (s)", "/config s", "RSS MiB", "model mapped", "torch loaded"]
    print(table(rows, header))
    print(f"page without model load: {verdict(no_model)}")
    print(f"written {path}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
