"""Chat in a process of its own: the model lives in a child Python process that Unload ends.

Why a process: memory (RAM and VRAM) is only really given back when the process holding it ends, and a
crash while generating (out of memory, a CUDA fault) must not take the web server down with it.

The parent and the child speak JSON lines over the child's stdin and stdout:
  parent -> child  {"op": "load" | "add_adapter" | "remove_adapter" | "stream" | "compare" | "status", ...}
  child -> parent  {"type": "partial", "text": ...}*  then  {"type": "done", "result": ...}
                   or {"type": "error", "message": ...}
One request at a time per child (a lock in the client), so concurrent callers queue and none is dropped.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from studio.core import procs
from studio.core.errors import ExitCode, StudioError
from studio.core.procs import exit_description, rss_mb
from studio.core.workspace import RunDir
from studio.data.errors import RowError
from studio.data.tools import parse_tools
from studio.services.chat import BASE, GenerationSettings, final_text

ROLES = ("system", "user", "assistant", "tool")  # tool: the result of a call, as the caller ran it
LOG_NAME = "chat.log"


class ChatError(StudioError, RuntimeError):
    """A chat request that cannot be answered; the message says what to do."""

    exit_code = ExitCode.FAILED


def check_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Plain {"role", "content"} dicts with string content, ending in a user turn (or a tool's result, which
    the assistant answers from)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatError(f"Message {i} must be a dict with a role in {ROLES} and text content (got {m!r}).")
        out.append({"role": m["role"], "content": m["content"]})
    if not out or out[-1]["role"] not in ("user", "tool"):
        raise ChatError("The conversation must end with a user message (or a tool result) to answer.")
    return out


def check_tools(tools: str | None) -> str | None:
    """The tools a conversation offers, as canonical JSON schemas; ChatError says what is wrong with them."""
    try:
        return parse_tools(tools, "tools")
    except RowError as err:
        raise ChatError(f"The tools are not usable: {err}") from None


def check_settings(settings: GenerationSettings | None) -> GenerationSettings:
    settings = settings or GenerationSettings()
    problems = settings.validate()
    if problems:
        raise ChatError(" ".join(problems))
    return settings


# -- the parent's side ------------------------------------------------------------------------------


@dataclass
class _Child:
    """One child process and what it has loaded. A new start() makes a new one."""

    popen: subprocess.Popen
    lines: queue.Queue  # protocol lines read by a reader thread; None marks the end of the stream
    source: str
    dtype: str
    quant_mode: str
    adapters: dict[str, str] = field(default_factory=dict)
    stopping: bool = False  # unload() ended it on purpose: not a crash


_LIVE: weakref.WeakSet[ChatProcess] = weakref.WeakSet()


@atexit.register
def _unload_all() -> None:
    # The child also exits when its stdin closes; this makes the exit prompt and reaps it.
    for proc in list(_LIVE):
        proc.unload()


@dataclass(eq=False)  # identity equality and hash: instances live in the WeakSet above
class ChatProcess:
    """The client: starts, talks to and ends a child process hosting a studio.services.chat.ChatSession."""

    home: Path  # the child's STUDIO_HOME; its log goes to home/logs
    load_timeout_s: float = 900.0  # start() and add_adapter(): a big model from a slow disk
    token_timeout_s: float = 300.0  # the longest silence between two pieces of a reply
    request_timeout_s: float = 60.0  # status and remove_adapter
    queue_timeout_s: float = 1800.0  # how long a caller waits for its turn before giving up
    _child: _Child | None = field(default=None, init=False, repr=False)
    _turn_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _state_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.home = Path(self.home)
        _LIVE.add(self)

    # -- what is loaded --------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.home / "logs" / LOG_NAME

    @property
    def alive(self) -> bool:
        child = self._child
        return child is not None and child.popen.poll() is None

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.popen.pid if child is not None and child.popen.poll() is None else None

    @property
    def source(self) -> str | None:
        base = self.base
        return base[0] if base else None

    @property
    def base(self) -> tuple[str, str, str] | None:
        """(source, dtype, quant_mode) of the loaded base model, or None."""
        child = self._child
        return (child.source, child.dtype, child.quant_mode) if child and child.popen.poll() is None else None

    @property
    def loaded_adapters(self) -> dict[str, str]:
        """Adapter name -> folder, for the adapters loaded now."""
        child = self._child
        return dict(child.adapters) if child is not None and child.popen.poll() is None else {}

    @property
    def memory_mb(self) -> float | None:
        """The child's resident memory, read without waiting for its turn."""
        pid = self.pid
        return rss_mb(pid) if pid else None

    # -- requests --------------------------------------------------------------------------------
    def start(self, source: str = "bundled", dtype: str = "fp32", quant_mode: str = "none") -> dict[str, Any]:
        """End any earlier child (one model in memory at a time), start a new one and load the base."""
        with self._turn():
            self._stop(self._forget())
            child = self._spawn(source, dtype, quant_mode)
            try:
                return self._request(child, {"op": "load", "source": source, "dtype": dtype, "quant_mode": quant_mode})
            except ChatError:
                self._stop(self._forget(child))
                raise

    def add_adapter(self, name: str, path: str | Path) -> None:
        with self._turn():
            child = self._require()
            self._request(child, {"op": "add_adapter", "name": name, "path": str(path)}, self.load_timeout_s)
            child.adapters[name] = str(path)

    def remove_adapter(self, name: str) -> None:
        with self._turn():
            child = self._require()
            self._request(child, {"op": "remove_adapter", "name": name}, self.request_timeout_s)
            child.adapters.pop(name, None)

    def status(self) -> dict[str, Any]:
        """What the child has loaded, its pid and memory; {"loaded": False} when there is no child."""
        if not self.alive:
            return {"loaded": False, "pid": None, "adapters": {}}
        with self._turn():
            return self._request(self._require(), {"op": "status"}, self.request_timeout_s)

    def stream(
        self,
        messages: list[dict[str, str]],
        settings: GenerationSettings | None = None,
        adapter: str | None = None,
        tools: str | None = None,
    ) -> Iterator[str]:
        """Yield the reply text as it grows. adapter: a loaded adapter's name, "base", or None (the active one).
        tools: JSON tool schemas the conversation offers (studio.data.tools)."""
        messages = check_messages(messages)
        settings = check_settings(settings)
        tools = check_tools(tools)
        with self._turn():
            child = self._require()
            self._check_adapter(child, adapter)
            self._send(child, self._generation_request("stream", messages, settings, adapter, tools))
            while True:
                msg = self._next(child, self.token_timeout_s)
                if msg["type"] == "error":
                    raise ChatError(msg["message"])
                if msg["type"] == "done":
                    return
                try:
                    yield msg["text"]
                except GeneratorExit:  # the caller stopped early: read the rest so the next request starts clean
                    self._drain(child)
                    raise

    def reply(
        self,
        messages: list[dict[str, str]],
        settings: GenerationSettings | None = None,
        adapter: str | None = None,
        tools: str | None = None,
    ) -> str:
        return final_text(self.stream(messages, settings, adapter, tools))

    def compare(
        self,
        messages: list[dict[str, str]],
        adapter: str,
        settings: GenerationSettings | None = None,
        tools: str | None = None,
    ) -> tuple[str, str]:
        """The same prompt answered without the adapter and with it: (base, adapter)."""
        messages = check_messages(messages)
        settings = check_settings(settings)
        tools = check_tools(tools)
        if adapter == BASE:
            raise ChatError("Compare needs an adapter to compare with the base; load one and choose it.")
        with self._turn():
            child = self._require()
            self._check_adapter(child, adapter)
            request = self._generation_request("compare", messages, settings, adapter, tools)
            base, tuned = self._request(child, request, self.load_timeout_s)  # two whole replies, no pieces
            return base, tuned

    @staticmethod
    def _generation_request(op: str, messages, settings: GenerationSettings, adapter, tools) -> dict[str, Any]:
        return {"op": op, "messages": messages, "settings": asdict(settings), "adapter": adapter, "tools": tools}

    def unload(self) -> None:
        """End the child and reap it: its memory is really given back. A reply in progress ends with a ChatError."""
        self._stop(self._forget())

    # -- plumbing --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        if not self._turn_lock.acquire(timeout=self.queue_timeout_s):
            raise ChatError(f"The chat model stayed busy for {self.queue_timeout_s:.0f} s; try again later.")
        try:
            yield
        finally:
            self._turn_lock.release()

    def _spawn(self, source: str, dtype: str, quant_mode: str) -> _Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = procs.python_env(self.home, TOKENIZERS_PARALLELISM="false")
        with open(self.log_path, "ab") as log:
            cmd = procs.python_command("studio.services.chatproc")
            popen = procs.spawn(cmd, env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=False)
        lines = procs.read_lines(popen.stdout)
        child = _Child(popen, lines, source, dtype, quant_mode)
        with self._state_lock:
            self._child = child
        return child

    def _forget(self, child: _Child | None = None) -> _Child | None:
        """Detach the current child (or `child`, if it still is the current one); return it for stopping."""
        with self._state_lock:
            current = self._child
            if current is None or (child is not None and current is not child):
                return child
            self._child = None
            current.stopping = True
            return current

    @staticmethod
    def _stop(child: _Child | None) -> None:
        """Close its stdin (it exits on its own when idle), then SIGTERM, then SIGKILL; always reap."""
        if child is None:
            return
        with contextlib.suppress(OSError):
            child.popen.stdin.close()  # it exits on its own when idle and its input ends
        procs.end(child.popen, ((None, 2.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)))

    def _require(self) -> _Child:
        child = self._child
        if child is None:
            raise ChatError("No chat model is loaded. Load a base model first.")
        if child.popen.poll() is not None:
            self._died(child)
        return child

    @staticmethod
    def _check_adapter(child: _Child, adapter: str | None) -> None:
        if adapter not in (None, BASE) and adapter not in child.adapters:
            loaded = ", ".join(child.adapters) or "none"
            raise ChatError(f"Adapter '{adapter}' is not loaded (loaded: {loaded}). Load it first.")

    def _died(self, child: _Child) -> None:
        """The child is gone (or going): forget it, reap it and raise a message the user can act on."""
        was_stopping = child.stopping
        self._stop(self._forget(child))
        if was_stopping:
            raise ChatError("The chat model was unloaded while it was answering. Load it again to go on.")
        raise ChatError(
            f"The chat process ended unexpectedly ({exit_description(child.popen.returncode)}); "
            f"load the model again. Its log: {self.log_path}"
        )

    def _send(self, child: _Child, request: dict[str, Any]) -> None:
        try:
            child.popen.stdin.write((json.dumps(request) + "\n").encode())
            child.popen.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):  # ValueError: stdin already closed by unload()
            self._died(child)

    def _next(self, child: _Child, timeout: float) -> dict[str, Any]:
        try:
            line = child.lines.get(timeout=timeout)
        except queue.Empty:
            self._stop(self._forget(child))
            raise ChatError(
                f"The chat process gave no answer for {timeout:.0f} s, so it was stopped; load the model again."
            ) from None
        if line is None:
            self._died(child)
        return json.loads(line)

    def _request(self, child: _Child, request: dict[str, Any], timeout: float | None = None) -> Any:
        self._send(child, request)
        while True:
            msg = self._next(child, timeout or self.load_timeout_s)
            if msg["type"] == "done":
                return msg.get("result")
            if msg["type"] == "error":
                raise ChatError(msg["message"])

    def _drain(self, child: _Child) -> None:
        with contextlib.suppress(ChatError):
            while self._next(child, self.token_timeout_s)["type"] not in ("done", "error"):
                pass


# -- the child's side -------------------------------------------------------------------------------


def describe(err: BaseException) -> str:
    """What the parent shows: a StudioError's own words (they say what to do), the cause's type otherwise."""
    if isinstance(err, (StudioError, ValueError)):
        return str(err)
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])  # str(KeyError) wraps the message in quotes
    return f"{type(err).__name__}: {err}"


class _Server:
    """Holds the ChatSession in the child and answers one request at a time."""

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self.send = send
        self.session = None

    def handle(self, req: dict[str, Any]) -> None:
        op = req.get("op")
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise ChatError(f"Unknown request '{op}'.")
        self.send({"type": "done", "result": handler(req)})

    def loaded(self):
        if self.session is None or not self.session.loaded:
            raise ChatError("No model is loaded in the chat process; load one first.")
        return self.session

    def op_load(self, req: dict[str, Any]) -> dict[str, Any]:
        from studio.services.chat import ChatSession

        self.session = None
        session = ChatSession(req["source"], req.get("dtype", "fp32"), req.get("quant_mode", "none"))
        session.load()
        self.session = session
        return self.op_status(req)

    def op_add_adapter(self, req: dict[str, Any]) -> list[str]:
        session = self.loaded()
        name, path = req["name"], Path(req["path"])
        if not RunDir.is_adapter(path):
            raise ChatError(
                f"'{path}' is not an adapter folder (it needs {RunDir.ADAPTER_CONFIG} and "
                f"{' or '.join(RunDir.ADAPTER_WEIGHTS)})."
            )
        try:
            session.add_adapter(name, path)
        except RuntimeError as err:  # size mismatches: an adapter trained on another base model
            raise ChatError(
                f"Adapter '{name}' does not fit the loaded base model '{session.source}'; "
                f"load the base it was trained on. ({err})"
            ) from err
        return list(session.adapters)

    def op_remove_adapter(self, req: dict[str, Any]) -> list[str]:
        session = self.loaded()
        session.remove_adapter(req["name"])
        return list(session.adapters)

    def _generation(self, req: dict[str, Any]) -> tuple[Any, list[dict[str, str]], GenerationSettings, str | None]:
        session = self.loaded()
        settings = check_settings(GenerationSettings(**req.get("settings", {})))
        adapter = req.get("adapter")
        if adapter not in (None, BASE) and adapter not in session.adapters:
            raise ChatError(f"Adapter '{adapter}' is not loaded (loaded: {', '.join(session.adapters) or 'none'}).")
        return session, check_messages(req["messages"]), settings, adapter

    def op_stream(self, req: dict[str, Any]) -> str:
        session, messages, settings, adapter = self._generation(req)
        final = ""
        for text in session.stream(messages, settings, adapter, check_tools(req.get("tools"))):
            if text != final:  # the streamer's last flush often repeats the text: send only growth
                final = text
                self.send({"type": "partial", "text": final})
        return final.strip()

    def op_compare(self, req: dict[str, Any]) -> list[str]:
        session, messages, settings, adapter = self._generation(req)
        return list(session.compare(messages, adapter, settings, check_tools(req.get("tools"))))

    def op_status(self, req: dict[str, Any]) -> dict[str, Any]:
        s = self.session
        info: dict[str, Any] = {"loaded": bool(s and s.loaded), "pid": os.getpid(), "rss_mb": rss_mb(os.getpid())}
        if s is not None and s.loaded:
            info.update(
                source=s.source,
                name=s.resolved.name if s.resolved else s.source,
                dtype=s.dtype,
                quant_mode=s.quant_mode,
                weights_in=s.weights_in,
                adapters=dict(s.adapters),
                active=s.active,
            )
        else:
            info["adapters"] = {}
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            if torch.cuda.is_available():
                info["cuda_mb"] = torch.cuda.memory_allocated() / 2**20
        return info


def main() -> int:
    # The protocol gets its own copy of stdout; fd 1 and sys.stdout then point at stderr, so stray
    # prints (ours, a library's, C code's) land in the log instead of corrupting the protocol.
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    server = _Server(send)
    sys.stderr.write(f"chat process {os.getpid()} ready\n")  # its log, not the user's screen
    try:
        while True:
            line = sys.stdin.readline()
            if not line:  # the parent closed our stdin or died: nothing left to serve
                return 0
            if not line.strip():
                continue
            try:
                server.handle(json.loads(line))
            except Exception as err:  # noqa: BLE001 - every failure goes back to the parent as a message
                traceback.print_exc(file=sys.stderr)
                send({"type": "error", "message": describe(err)})
    except BrokenPipeError:  # the parent went away mid-reply
        return 0


if __name__ == "__main__":
    sys.exit(main())
