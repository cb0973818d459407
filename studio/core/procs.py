"""Child processes, one way: started without a shell in a session of their own, read line by line,
ended with their whole tree, always reaped. The worker launch, chat, evaluation and export use it.

Processes and memory are read through psutil (portable, and it knows a zombie from a live process).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

import psutil

from studio.core.allocator import child_env
from studio.core.workspace import REPO_ROOT

# SIGTERM first (the child saves and exits), SIGKILL if it does not: (signal, seconds to wait after it).
GENTLE_END = ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0))


def python_env(home: os.PathLike | str, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a studio child process: the workspace, unbuffered output, this checkout first on
    the import path (the child runs the same code as its parent) and the allocator the studio prefers."""
    env = child_env(
        dict(base if base is not None else os.environ, STUDIO_HOME=str(home), PYTHONUNBUFFERED="1", **extra)
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: this process gets `sig` when its parent dies, so a launcher killed hard leaves no rank behind
    (torchrun puts each rank in a session of its own, out of reach of a process-group kill)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before the call
        os.kill(os.getpid(), sig)


def python_command(module: str, *args: str) -> list[str]:
    """`python -m MODULE ARGS...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def spawn(cmd: Sequence[str], env: Mapping[str, str], *, stdin: Any = subprocess.DEVNULL, stdout: Any = None,
          stderr: Any = None, text: bool = True, cwd: str | None = None, own_session: bool = True,
          end_with_parent: signal.Signals | None = None,
          ) -> subprocess.Popen:  # fmt: skip
    """Start cmd (never through a shell) in a session of its own: a Ctrl-C in the server's terminal does
    not reach it, and its process group is its pid, so `end` can end the child and everything it started.
    `own_session=False` keeps it in the parent's group, for a helper that must end with its parent;
    `end_with_parent` sends the child that signal when this process dies, even killed hard (Linux)."""
    preexec = None if end_with_parent is None else (lambda: die_with_parent(end_with_parent))
    return subprocess.Popen(
        list(cmd), stdin=stdin, stdout=stdout, stderr=stderr, text=text, env=dict(env), cwd=cwd,
        start_new_session=own_session, preexec_fn=preexec,
    )  # fmt: skip


def read_lines(stream: IO, into: queue.Queue | None = None, strip: bool = True) -> queue.Queue:
    """Put each line of stream (text, or bytes read as UTF-8) into a queue from a daemon thread, then None
    when the stream ends."""
    lines: queue.Queue = into if into is not None else queue.Queue()

    def pump() -> None:
        try:
            for raw in stream:
                line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
                lines.put(line.rstrip("\n") if strip else line)
        except (OSError, ValueError):  # closed under us
            pass
        finally:
            lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def end(popen: subprocess.Popen, steps: Iterable[tuple[signal.Signals | None, float]] = GENTLE_END) -> None:
    """End a child started by `spawn` and everything in its process group: each step sends its signal
    (None: send nothing, just wait) and waits; the child is always reaped and its pipes closed."""
    for sig, wait_s in steps:
        if popen.poll() is not None:
            break
        if sig is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=wait_s)
    for stream in (popen.stdin, popen.stdout, popen.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def exit_description(code: int | None) -> str:
    """'exit code 1', or 'exit code -9, killed by SIGKILL' for a child ended by a signal."""
    if code is not None and code < 0:
        try:
            return f"exit code {code}, killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


def process_start_token(pid: int) -> str | None:
    """When the process started: a pid reused by another program gives another token."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except (psutil.Error, OSError):
        return None


def process_alive(pid: int | None, token: str | None = None) -> bool:
    """pid runs (a zombie, exited but not reaped, does not count) and, given a token, is the same process."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return token is None or process_start_token(pid) == token


def child_pids(pid: int, recursive: bool = True) -> list[int]:
    """The live children of pid, with every further descendant when recursive."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=recursive)]
    except psutil.Error:
        return []


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (None where there is no such process)."""
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB. psutil has no portable peak, so this is getrusage's,
    whose unit is KiB on Linux and bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
