"""What every `studio` subcommand shares: the usage error, the one `error:` printer, `--set` parsing,
loading a run config from a file or a preset, and following a run's progress."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml

from studio.core.config import RunConfig, merge_dicts
from studio.core.errors import StudioError


class UsageError(StudioError):
    """Bad input from the user: exit 2."""


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def exits_cleanly(command: Callable[..., int]) -> Callable[..., int]:
    """The one error-to-exit mapping of `studio`: a StudioError becomes one `error:` line on stderr and its
    kind's exit status (2 bad input, 1 failed); anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> int:
        try:
            return command(*args, **kwargs)
        except StudioError as err:
            return _fail(err.one_line(), err.exit_code)

    return run


def _parse_set(pairs: list[str]) -> dict:
    """`--set train.max_steps=10` -> {"train": {"max_steps": 10}}; values parsed as YAML scalars."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--set takes KEY=VALUE (e.g. train.max_steps=10), got '{pair}'")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_run_config(spec: str, overrides: list[str] | None = None) -> RunConfig:
    """A config file or preset file (partial configs are merged over the defaults; a preset's
    `description` is allowed), or a preset name, with --set overrides merged on top."""
    from studio.core.presets import load_preset

    config = load_preset(spec)
    if overrides:
        config = RunConfig.from_dict(merge_dicts(config.to_dict(), _parse_set(overrides)))
    return config


# -- train --------------------------------------------------------------------------------------
def _bar(step: int, total: int, width: int = 30) -> str:
    filled = int(width * step / total) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def follow(jobs, run_id: str) -> int:
    """Tail a run on the terminal until it ends; Ctrl-C aborts it (saving a checkpoint)."""
    from studio.core.store import RunStatus

    tty = sys.stdout.isatty()
    last_event, last_step, aborting = 0, -1, False
    try:
        while True:
            try:
                jobs.reconcile()
                run = jobs.store.get_run(run_id)
                for ev in jobs.store.events(run_id, last_event):
                    last_event = ev.id
                    if tty:
                        print("\r\033[K", end="")
                    print(f"[{ev.level}] {ev.message}")
                points = jobs.store.metrics(run_id, last_step)
                losses = [m for m in points if m.loss is not None]
                for m in points:
                    last_step = max(last_step, m.step)
                if losses or (tty and run.total_steps):
                    loss = losses[-1].loss if losses else run.final_loss
                    line = f"{_bar(run.step, run.total_steps)} step {run.step}/{run.total_steps}"
                    if loss is not None:
                        line += f"  loss {loss:.4f}"
                    if losses and losses[-1].tokens_per_s:
                        line += f"  {losses[-1].tokens_per_s:.0f} tok/s"
                    print(("\r\033[K" + line) if tty else line, end="" if tty else "\n", flush=True)
                if run.status.finished:
                    break
                time.sleep(0.5)
            except KeyboardInterrupt:
                if aborting:
                    raise
                aborting = True
                print("\nAborting: the worker saves a checkpoint, then stops (Ctrl-C again to leave it running).")
                jobs.abort(run_id)
    except KeyboardInterrupt:
        print(f"\nLeft run {run_id} to finish in the background.")
        return 1
    if tty:
        print()
    if run.status == RunStatus.COMPLETED:
        loss = f", final loss {run.final_loss:.4f}" if run.final_loss is not None else ""
        print(f"completed in {run.duration_s:.0f} s{loss}")
        print(f"adapter: {run.adapter_dir}")
        return 0
    print(f"{run.status.value}: {run.error or ''}".rstrip(), file=sys.stderr)
    return 1
