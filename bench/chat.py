"""Chat tab vs plain `model.generate`: first-token latency and tokens/s, same prompt, same settings.

Studio side: a studio.services.chatproc.ChatProcess (the class the Chat tab uses, through the same calls: start,
stream, unload) with a temporary STUDIO_HOME, started on the bundled base model (fp32, no adapter, no
quantization); that load is timed once (reported, not a goal). Each request is `ChatProcess.stream` with
one user message (the tab's default: no system prompt) and GenerationSettings(max_new_tokens=N): temperature
0 is greedy, the rest the tab's defaults (repetition_penalty 1.1). Timed in this process: sent (just before
the generator's first step, which sends the request), the first non-empty piece, and done (the generator
ends). So it includes everything the tab pays for: JSON lines over pipes, the child's generate thread and
TextIteratorStreamer, the reader thread.

Baseline side: plain transformers in a child of this module (`--baseline-child`), not in this process: it
gets the chat process's environment (studio_env + studio.core.allocator.child_env, so the same preloaded
allocator and torch's default thread count; neither side calls torch.set_num_threads) and a fresh heap, so
the difference measured is the chat machinery, not the allocator or this process's state. It loads
AutoModelForCausalLM.from_pretrained(resolve_model("bundled").path, dtype=float32), templates and tokenizes
the prompt as studio.services.chat.ChatSession.prompt_ids does, and runs model.generate in a thread with a
TextIteratorStreamer (skip_prompt, skip_special_tokens) and the same generate kwargs
(GenerationSettings.generate_kwargs(): do_sample=False, max_new_tokens=N, repetition_penalty). Timed inside
that child: request read, first non-empty piece, generate returned.

A "piece" is what TextIteratorStreamer lets out: text up to a word boundary, so first-token latency is the
time to the first word (prompt templating and prefill included), the same on both sides. Tokens: the chat
process reports no token count, so both sides count by tokenizing the final stripped reply with the bundled
tokenizer (add_special_tokens=False); the baseline also reports its exact count of generated ids. Figures:
end-to-end tokens/s = tokens / (done - sent), the one the goal compares (ratio of the medians); decode
tokens/s = (tokens - 1) / (done - first piece). After one untimed warm-up each, the sides alternate (studio,
baseline, studio, ...), one at a time: neither child computes while the other generates. Writes
bench/results/chat.json (with the load average before and after, and each side's best run) and prints a
table. Under a minute on an otherwise idle 2-core CPU. Both sides run torch's default thread count (all
cores); when another process competes for a core, each decode step waits on descheduled threads and both
sides slow down several times (seen here: 2 threads 1-22 tok/s under load, 1 thread a steady 17), so read
the figures together with the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import MODEL_CACHE, REPO, median, studio_env, table, verdict, write_result

PROMPT = "Write a short story about a lighthouse keeper."
TOKENS_PER_S_RATIO = 0.9
FIRST_TOKEN_S = 1.0
TIMEOUT_S = 300.0


# -- the baseline child -----------------------------------------------------------------------------


def baseline_child(prompt: str, max_new_tokens: int) -> int:
    """Load the bundled model with plain transformers, then answer one generation per line read on stdin."""
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)  # stray prints go to stderr, not here
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    started = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    from studio.core.allocator import loaded_allocator
    from studio.model.loading import resolve_model
    from studio.services.chat import GenerationSettings

    path = resolve_model("bundled").path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kwargs = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0).generate_kwargs()
    messages = [{"role": "user", "content": prompt}]
    send(
        {
            "type": "ready",
            "load_s": time.perf_counter() - started,
            "torch_threads": torch.get_num_threads(),
            "allocator": loaded_allocator(),
            "generate_kwargs": kwargs,
        }
    )
    for line in sys.stdin:
        if not line.strip():
            continue
        t_sent = time.perf_counter()
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        out: list[Any] = []

        def work(ids=ids, streamer=streamer, out=out) -> None:
            try:
                out.append(
                    model.generate(
                        input_ids=ids,
                        attention_mask=ids.new_ones(ids.shape),
                        streamer=streamer,
                        pad_token_id=pad,
                        **kwargs,
                    )
                )
            except BaseException as err:  # noqa: BLE001 - reported to the parent below
                out.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        reply, t_first = "", None
        for piece in streamer:
            reply += piece
            if t_first is None and reply.strip():  # the first piece with text, as on the studio side
                t_first = time.perf_counter()
        thread.join()
        t_end = time.perf_counter()
        if isinstance(out[0], BaseException):
            send({"type": "error", "message": f"{type(out[0]).__name__}: {out[0]}"})
            continue
        send(
            {
                "type": "done",
                "text": reply.strip(),
                "first_s": None if t_first is None else t_first - t_sent,
                "total_s": t_end - t_sent,
                "generated_ids": int(out[0].shape[1] - ids.shape[1]),
            }
        )
    return 0


class Baseline:
    """The parent's handle on the baseline child: one generation per request, JSON lines back."""

    def __init__(self, home: Path, prompt: str, max_new_tokens: int) -> None:
        from studio.core.allocator import child_env

        self.log = home / "logs" / "baseline.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = child_env(studio_env(home))  # what ChatProcess._spawn gives the chat child
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "bench.chat", "--baseline-child", "--prompt", prompt]
        cmd += ["--max-new-tokens", str(max_new_tokens)]
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO
            )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self._next()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in self.popen.stdout:
                self.lines.put(raw.decode("utf-8", errors="replace"))
        self.lines.put(None)

    def _next(self) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=TIMEOUT_S)
        except queue.Empty:
            line = None
        if line is None:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"the baseline child gave no answer (exit code {self.popen.poll()})\n{tail}")
        msg = json.loads(line)
        if msg["type"] == "error":
            raise RuntimeError(f"baseline generation failed: {msg['message']}")
        return msg

    def generate(self) -> dict[str, Any]:
        self.popen.stdin.write(b"go\n")
        self.popen.stdin.flush()
        return self._next()

    def close(self) -> None:
        """Close its stdin (it ends when idle), then SIGTERM, then SIGKILL; always reap."""
        with contextlib.suppress(OSError):
            self.popen.stdin.close()
        for sig, wait_s in ((None, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
            if sig is not None and self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue


# -- the studio side --------------------------------------------------------------------------------


def studio_generate(proc, prompt: str, settings) -> dict[str, Any]:
    """One streamed reply through the chat process, as the tab asks for it; times in this process."""
    from studio.services.chat import BASE

    stream = proc.stream([{"role": "user", "content": prompt}], settings, BASE)  # the tab's "base (no adapter)"
    text, t_first = "", None
    t_sent = time.perf_counter()  # the generator sends the request on its first step, below
    for partial in stream:
        if t_first is None and partial.strip():
            t_first = time.perf_counter()
        text = partial
    t_end = time.perf_counter()
    return {
        "text": text.strip(),
        "first_s": None if t_first is None else t_first - t_sent,
        "total_s": t_end - t_sent,
    }


# -- figures ----------------------------------------------------------------------------------------


def rates(run: dict[str, Any], tokens: int) -> dict[str, Any]:
    total, first = run["total_s"], run["first_s"]
    decode = (tokens - 1) / (total - first) if first is not None and tokens > 1 and total > first else None
    return {
        "tokens": tokens,
        "first_s": None if first is None else round(first, 4),
        "total_s": round(total, 4),
        "e2e_tokens_per_s": round(tokens / total, 3) if total > 0 else None,
        "decode_tokens_per_s": None if decode is None else round(decode, 3),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("first_s", "total_s", "e2e_tokens_per_s", "decode_tokens_per_s", "tokens")
    return {k: median(r[k] for r in runs) for k in keys}


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest figure of each kind: what the side does when nothing else competes for the cores."""
    return {
        "first_s": min(r["first_s"] for r in runs if r["first_s"] is not None) if runs else None,
        "e2e_tokens_per_s": max(r["e2e_tokens_per_s"] for r in runs) if runs else None,
        "decode_tokens_per_s": max((r["decode_tokens_per_s"] or 0) for r in runs) if runs else None,
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chat")
    p.add_argument("--repeats", type=int, default=5, help="timed generations per side (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per reply (default 64)")
    p.add_argument("--prompt", default=PROMPT, help="the user message (default: a short story)")
    p.add_argument("--baseline-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv if argv is not None else (sys.argv[1:] if __name__ == "__main__" else []))
    os.environ.setdefault("STUDIO_MODEL_CACHE", str(MODEL_CACHE))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if args.baseline_child:
        return baseline_child(args.prompt, args.max_new_tokens)

    from studio.core.allocator import loaded_allocator
    from studio.services.chat import GenerationSettings
    from studio.services.chatproc import ChatProcess

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0)
    if settings.validate() or args.repeats < 1:
        p.error(" ".join([*settings.validate(), *(["--repeats must be at least 1."] if args.repeats < 1 else [])]))
    load_before = os.getloadavg()
    raw: dict[str, list[dict[str, Any]]] = {"studio": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        home = Path(tmp) / "home"
        proc = ChatProcess(home=home)
        baseline = None
        try:
            started = time.perf_counter()
            loaded = proc.start("bundled", "fp32", "none")  # the tab's Load with the defaults
            studio_load_s = time.perf_counter() - started
            studio_allocator = loaded_allocator(Path(f"/proc/{proc.pid}/maps")) if proc.pid else "unknown"
            baseline = Baseline(home, args.prompt, args.max_new_tokens)  # loads only after the chat child has
            studio_generate(proc, args.prompt, settings)  # untimed warm-ups, one each
            baseline.generate()
            for _ in range(args.repeats):
                raw["studio"].append(studio_generate(proc, args.prompt, settings))
                raw["baseline"].append(baseline.generate())
        except Exception:
            log = proc.log_path
            if log.exists():
                print(f"chat process log ({log}):\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
            raise
        finally:
            proc.unload()
            if baseline is not None:
                baseline.close()

    # Counted only now, so this process stays idle while the children generate.
    from transformers import AutoTokenizer

    from studio.model.loading import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("bundled").path)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    runs = {side: [rates(r, count(r["text"])) for r in raw[side]] for side in raw}
    for run, r in zip(runs["baseline"], raw["baseline"], strict=True):
        run["generated_ids"] = r["generated_ids"]
    for s, b in zip(runs["studio"], runs["baseline"], strict=True):
        s["ratio_e2e"] = round(s["e2e_tokens_per_s"] / b["e2e_tokens_per_s"], 3)
    medians = {side: summary(runs[side]) for side in runs}
    same_text = [s["text"] == b["text"] for s, b in zip(raw["studio"], raw["baseline"], strict=True)]
    ratio = medians["studio"]["e2e_tokens_per_s"] / medians["baseline"]["e2e_tokens_per_s"]
    first = medians["studio"]["first_s"]
    goals = {
        f"tokens_per_s_ratio >= {TOKENS_PER_S_RATIO}": ratio >= TOKENS_PER_S_RATIO,
        f"first_token_s <= {FIRST_TOKEN_S}": first is not None and first <= FIRST_TOKEN_S,
    }
    path = write_result(
        "chat",
        {
            "what": "chat tab (studio.services.chatproc.ChatProcess.stream) vs plain model.generate with a "
            "TextIteratorStreamer: first-token latency and tokens/s, bundled model, fp32, CPU",
            "config": {
                "prompt": args.prompt,
                "messages": [{"role": "user", "content": args.prompt}],
                "settings": dataclasses.asdict(settings),
                "generate_kwargs": settings.generate_kwargs(),
                "repeats": args.repeats,
                "warmup": 1,
                "order": "alternating, studio first, one side at a time",
            },
            "method": {
                "tokens": "len(tokenizer(reply.strip(), add_special_tokens=False).input_ids), both sides (the chat "
                "process reports no count); baseline generated_ids: exact ids generate returned",
                "first_s": "request sent -> first non-empty streamer piece (a word: prompt templating and "
                "prefill included)",
                "e2e_tokens_per_s": "tokens / (done - sent); the goal's ratio compares their medians",
                "decode_tokens_per_s": "(tokens - 1) / (done - first piece)",
                "studio_timed_in": "the bench process (pipes, JSON and the chat child's threads included)",
                "baseline_timed_in": "the baseline child itself (plain generate, same env and allocator)",
            },
            "studio": {
                "load_s": round(studio_load_s, 3),
                "loaded": loaded,
                "allocator": studio_allocator,
                "runs": runs["studio"],
                "median": medians["studio"],
                "best": best(runs["studio"]),
            },
            "baseline": {
                "load_s": round(baseline.ready["load_s"], 3),
                "torch_threads": baseline.ready["torch_threads"],
                "allocator": baseline.ready["allocator"],
                "generate_kwargs": baseline.ready["generate_kwargs"],
                "runs": runs["baseline"],
                "median": medians["baseline"],
                "best": best(runs["baseline"]),
            },
            "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
            "same_text": same_text,
            "texts": {"studio": raw["studio"][0]["text"], "baseline": raw["baseline"][0]["text"]},
            "ratio_e2e_tokens_per_s": round(ratio, 3),
            "median_pair_ratio_e2e": median(s["ratio_e2e"] for s in runs["studio"]),
            "best_ratio_e2e": round(
                best(runs["studio"])["e2e_tokens_per_s"] / best(runs["baseline"])["e2e_tokens_per_s"], 3
            ),
            "first_token_s": {"studio": first, "baseline": medians["baseline"]["first_s"]},
            "goals": goals,
        },
    )
    rows = [
        [
            name,
            fmt(load, ".1f"),
            fmt(medians[side]["first_s"], ".3f"),
            fmt(medians[side]["e2e_tokens_per_s"], ".1f"),
            fmt(medians[side]["decode_tokens_per_s"], ".1f"),
            fmt(medians[side]["tokens"], ".0f"),
            fmt(best(runs[side])["e2e_tokens_per_s"], ".1f"),
        ]
        for name, side, load in (
            ("chat process", "studio", studio_load_s),
            ("model.generate", "baseline", baseline.ready["load_s"]),
        )
    ]
    print(table(rows, ["side (medians)", "load s", "first s", "e2e tok/s", "decode tok/s", "tokens", "best e2e tok/s"]))
    print(
        f"tokens/s ratio {ratio:.3f} (goal >= {TOKENS_PER_S_RATIO}): {verdict(ratio >= TOKENS_PER_S_RATIO)}; "
        f"first token {fmt(first, '.3f')} s (goal <= {FIRST_TOKEN_S}): {verdict(goals[list(goals)[1]])}; "
        f"same text {sum(same_text)}/{len(same_text)}; "
        f"allocator {studio_allocator} / {baseline.ready['allocator']}; "
        f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(f"written {path}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
