"""Run cards: a Markdown README beside the adapter (base model, data, hyperparameters, curves, evaluation,
the exact command), so an adapter that leaves the studio still says what it is and how it was made.

Rendering is pure (`render_card`, `svg_line_chart`); `write_card` gathers the facts from the store and the
run folder and writes them. Curves are small hand-written SVGs: no plotting dependency, and they render on
the hub and in any Markdown viewer.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as _escape

import yaml

from studio.core.errors import StudioError
from studio.core.fsutil import atomic_write
from studio.core.store import Metric, Run, RunNotFound, Store, iso
from studio.core.workspace import RunDir

MAX_EXAMPLES = 5
SPARSE_POINTS = 12  # a series with this few points also gets a dot per point
LOG_TAIL_MARK = "--- last log lines ---"
# The bundled model is this hub model, converted from its Q4_1 GGUF (so its weights are de-quantized).
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_LICENSE = "apache-2.0"
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


class CardError(StudioError, ValueError):
    """A card that cannot be written; the message says what to do."""


# -- SVG line charts ----------------------------------------------------------------------------------


def escape(text: str) -> str:
    """Text for an SVG element: XML-escaped, without the control characters XML 1.0 forbids."""
    return _escape("".join(c for c in str(text) if c >= " " or c in "\t\n\r"))


Point = tuple[float, float]


def finite_points(points: Sequence[tuple[Any, Any]]) -> list[Point]:
    """The points whose x and y are both real numbers (None, NaN and inf are dropped)."""
    out: list[Point] = []
    for x, y in points:
        if _is_finite(x) and _is_finite(y):
            out.append((float(x), float(y)))
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) covering [lo, hi], about `count` of them."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:  # one value: give it room around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.floor(lo / step + 1e-9) * step
    last = math.ceil(hi / step - 1e-9) * step
    n = round((last - first) / step)
    return [_clean(first + i * step, step) for i in range(n + 1)]


def format_tick(value: float, step: float) -> str:
    """A tick label with as many decimals as the tick step needs; tiny steps (learning rates) as 2e-4."""
    if value == 0:
        return "0"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if decimals > 3:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if abs(value) >= 1e6:
        return f"{value:.3g}"
    return f"{value:.{decimals}f}"


def svg_line_chart(
    series: dict[str, Sequence[tuple[Any, Any]]],
    title: str,
    x_label: str,
    y_label: str,
    width: int = 640,
    height: int = 320,
) -> str:
    """A standalone SVG line chart: axes with round ticks, a legend, one polyline per series (a dot when a
    series has a single point). Points with None or NaN are skipped; no points at all says "no data"."""
    clean = {name: finite_points(points) for name, points in series.items()}
    left, right, top, bottom = 72, 16, 40, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="15" font-weight="bold">'
        f"{escape(title)}</text>",
    ]
    everything = [p for points in clean.values() for p in points]
    if not everything:
        parts.append(
            f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" fill="#888888">no data</text>'
        )
        return "\n".join([*parts, "</svg>"]) + "\n"

    xs, ys = [p[0] for p in everything], [p[1] for p in everything]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    parts += _axes(left, top, plot_w, plot_h, x_ticks, y_ticks, px, py, x_label, y_label)
    for i, points in enumerate(clean.values()):
        color = _COLORS[i % len(_COLORS)]
        if len(points) > 1:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{coords}"/>')
        if len(points) <= SPARSE_POINTS:  # a lone or sparse series (eval loss) shows its points
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in points]
    named = [(name, _COLORS[i % len(_COLORS)]) for i, (name, points) in enumerate(clean.items()) if points]
    if len(named) > 1:  # one series is named by the title already
        parts += _legend(named, width - right, top)
    return "\n".join([*parts, "</svg>"]) + "\n"


def _axes(left, top, plot_w, plot_h, x_ticks, y_ticks, px, py, x_label: str, y_label: str) -> list[str]:
    base = top + plot_h
    out = [
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444444"/>',
    ]
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
    for t in x_ticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{base}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle">{escape(format_tick(t, x_step))}</text>')
    for t in y_ticks:
        y = py(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(format_tick(t, y_step))}</text>')
    mid_y = top + plot_h / 2
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{base + 38}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(
        f'<text x="16" y="{mid_y:.1f}" text-anchor="middle" transform="rotate(-90 16 {mid_y:.1f})">'
        f"{escape(y_label)}</text>"
    )
    return out


def _legend(names: list[tuple[str, str]], right_edge: float, top: float) -> list[str]:
    """Top right inside the plot, on a translucent box so lines under it stay readable."""
    text_w = 7 * max(len(n) for n, _ in names)  # ~7 px per character at font-size 12
    x = right_edge - 10 - text_w
    out = [
        f'<rect x="{x - 30:.1f}" y="{top + 4}" width="{text_w + 36}" height="{16 * len(names) + 6}" '
        'fill="#ffffff" fill-opacity="0.85" stroke="#cccccc"/>'
    ]
    for i, (name, color) in enumerate(names):
        y = top + 20 + 16 * i
        out.append(
            f'<line x1="{x - 24:.1f}" y1="{y - 4}" x2="{x - 6:.1f}" y2="{y - 4}" stroke="{color}" stroke-width="3"/>'
        )
        out.append(f'<text x="{x:.1f}" y="{y}">{escape(name)}</text>')
    return out


# -- the charts a card shows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Chart:
    file: str  # name inside the card's image folder
    alt: str
    svg: str


def metric_points(metrics: Sequence[Metric], name: str) -> list[Point]:
    return finite_points([(m.step, getattr(m, name, None)) for m in metrics])


def card_charts(metrics: Sequence[Metric]) -> list[Chart]:
    """The curves worth drawing for these metrics: loss (train and eval together, so overfitting shows),
    learning rate and gradient norm; a metric never logged gets no chart."""
    train, evals = metric_points(metrics, "loss"), metric_points(metrics, "eval_loss")
    charts: list[Chart] = []
    if train or evals:
        series = {"train loss": train, **({"eval loss": evals} if evals else {})}
        alt = "Training and eval loss" if evals else "Training loss"
        charts.append(Chart("loss.svg", alt, svg_line_chart(series, alt, "step", "loss")))
    lr = metric_points(metrics, "learning_rate")
    if lr:
        charts.append(
            Chart("learning_rate.svg", "Learning rate", svg_line_chart({"lr": lr}, "Learning rate", "step", "lr"))
        )
    norm = metric_points(metrics, "grad_norm")
    if norm:
        charts.append(
            Chart(
                "grad_norm.svg", "Gradient norm", svg_line_chart({"grad norm": norm}, "Gradient norm", "step", "norm")
            )
        )
    return charts


# -- the Markdown card -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    kind: str  # "bundled" | "local" | "hub" | "unknown"
    source: str  # what the config named
    path: str  # where it was loaded from
    hub_id: str | None  # what the hub knows it as, for base_model in the front matter
    license: str | None


def base_model_info(run: Run, run_json: dict | None) -> BaseModelInfo:
    """From run.json when the adapter exists (it records the resolved model), else from the config alone."""
    base = (run_json or {}).get("base_model") or {}
    source = str(base.get("source") or _get(run.config, "model.source") or run.model or "bundled")
    kind = base.get("kind") or ("bundled" if source in ("bundled", "") else "unknown")
    name = str(base.get("name") or ("SmolLM2-135M-Instruct" if kind == "bundled" else Path(source).name or source))
    path = str(base.get("path") or source)
    if kind == "bundled":
        return BaseModelInfo(name, kind, source, path, BUNDLED_HUB_ID, BUNDLED_LICENSE)
    return BaseModelInfo(name, kind, source, path, source if kind == "hub" else None, None)


def reproduce_command(run_dir: str | Path) -> str:
    return f"studio train {shlex.quote(str(RunDir(run_dir).config))}"


def render_card(
    run: Run,
    metrics: Sequence[Metric],
    run_json: dict | None,
    eval_report: dict | None,
    dataset_entries: list[dict],
    command: str,
    events_warnings: list[str],
    image_dir: str = RunDir.CARD_IMAGES,
    has_adapter: bool | None = None,
) -> str:
    """The whole card as Markdown. `has_adapter` defaults to whether run.json exists (training writes it
    last); links to images point into `image_dir` (relative to the card; "" = beside it)."""
    has_adapter = run_json is not None if has_adapter is None else has_adapter
    config = (run_json or {}).get("config") or run.config
    base = base_model_info(run, run_json)
    charts = card_charts(metrics)
    sections = [
        front_matter(base, config),
        f"# {_inline(run.name or run.id)}\n\n{summary_line(run, run_json, base, config, has_adapter)}",
        base_section(base),
        data_section(config, dataset_entries, run_json),
        hyperparameter_section(config),
        training_section(run, metrics, run_json),
        curves_section(charts, image_dir),
        evaluation_section(eval_report),
        notes_section(run, events_warnings),
        reproduce_section(run, command, config, base, has_adapter),
    ]
    return "\n\n".join(s for s in sections if s).rstrip() + "\n"


def front_matter(base: BaseModelInfo, config: dict) -> str:
    meta: dict[str, Any] = {"library_name": "peft"}
    if base.hub_id:
        meta["base_model"] = base.hub_id
    if base.license:
        meta["license"] = base.license
    meta["tags"] = ["lora", "lora-studio"] + (["qlora"] if _get(config, "quant.mode") == "4bit" else [])
    meta["pipeline_tag"] = "text-generation"
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def summary_line(run: Run, run_json: dict | None, base: BaseModelInfo, config: dict, has_adapter: bool) -> str:
    datasets = ", ".join(_get(config, "data.datasets") or []) or "no dataset"
    lora = f"r={_get(config, 'lora.r')}, alpha={_num(_get(config, 'lora.alpha'))}"
    if not has_adapter:
        why = f": {_inline(run.error.splitlines()[0])}" if run.error else ""
        return (
            f"> **No adapter exists for this run.** It is {run.status.value}{why}. This card records what was "
            f"tried: LoRA ({lora}) on {base.name} with {datasets}, {run.step} steps logged."
        )
    steps = (run_json or {}).get("global_step", run.step)
    loss = (run_json or {}).get("final_loss", run.final_loss)
    loss_text = f", final train loss {_num(loss, 4)}" if _is_finite(loss) else ""
    return (
        f"A LoRA adapter ({lora}) for **{base.name}**, trained with LoRA Studio ({stage_text(config)}) on "
        f"{datasets} for {steps} steps{loss_text}."
    )


STAGE_NAMES = {"sft": "supervised fine-tuning", "dpo": "DPO", "kto": "KTO", "orpo": "ORPO"}


def stage_text(config: dict) -> str:
    """'supervised fine-tuning', or 'DPO, sigmoid loss, beta 0.1, from run X' for a preference stage."""
    stage = _get(config, "stage") or "sft"
    name = STAGE_NAMES.get(stage, stage)
    if stage == "sft":
        return name
    parts = [name]
    if stage == "dpo":
        parts.append(f"{_get(config, 'preference.loss_type') or 'sigmoid'} loss")
    parts.append(f"beta {_num(_get(config, 'preference.beta'))}")
    start = _get(config, "preference.start_from")
    if start:
        parts.append(f"from run {start}")
    return ", ".join(parts)


def base_section(base: BaseModelInfo) -> str:
    rows = [("Name", base.name), ("Kind", base.kind), ("Source", f"`{base.source}`")]
    if base.kind == "bundled":
        rows.append(("Hub equivalent", f"`{BUNDLED_HUB_ID}` (weights de-quantized from its Q4_1 GGUF)"))
    elif base.path != base.source:
        rows.append(("Loaded from", f"`{base.path}`"))
    if base.license:
        rows.append(("License", base.license))
    return "## Base model\n\n" + _table(("Field", "Value"), rows)


def data_section(config: dict, entries: list[dict], run_json: dict | None) -> str:
    lines = ["## Data", ""]
    if entries:
        rows = []
        for e in entries:
            if e.get("missing"):
                rows.append((e.get("name", "?"), "—", "—", "not registered any more"))
                continue
            sha = str(e.get("sha256") or "")[:12]
            rows.append((e.get("name", "?"), e.get("format", "?"), _int(e.get("rows")), f"`{sha}`" if sha else "—"))
        lines += [_table(("Dataset", "Format", "Rows", "sha256"), rows), ""]
    else:
        lines += ["No dataset recorded.", ""]
    cutoff = _get(config, "data.cutoff_len")
    val = _get(config, "data.val_size") or 0
    facts = [
        f"cutoff {cutoff} tokens" if cutoff else None,
        f"at most {_get(config, 'data.max_samples')} rows per dataset" if _get(config, "data.max_samples") else None,
        f"{_num(100 * val)}% held out for eval" if _is_finite(val) and val > 0 else "no validation split",
        "packed" if _get(config, "data.packing") else "not packed",
        "prompts trained too" if _get(config, "data.train_on_prompt") else "loss on answers only",
    ]
    if run_json is not None:
        facts.append(f"{_int(run_json.get('train_samples'))} train / {_int(run_json.get('eval_samples'))} eval samples")
        if _is_finite(run_json.get("padding_share")):
            facts.append(f"padding {100 * run_json['padding_share']:.1f}% of positions")
    lines.append("Preparation: " + "; ".join(f for f in facts if f) + ".")
    return "\n".join(lines)


def hyperparameter_section(config: dict) -> str:
    def g(key: str) -> Any:
        return _get(config, key)

    r, alpha = g("lora.r"), g("lora.alpha")
    scale = None
    if _is_finite(r) and _is_finite(alpha) and r:
        scale = alpha / math.sqrt(r) if g("lora.use_rslora") else alpha / r
    targets = g("lora.target_modules")
    targets = ", ".join(targets) if isinstance(targets, list) else targets
    variants = [v for v, on in (("rsLoRA", g("lora.use_rslora")), ("DoRA", g("lora.use_dora"))) if on]
    max_steps = g("train.max_steps") or 0
    batch, accum = g("train.batch_size"), g("train.grad_accum")
    effective = batch * accum if _is_finite(batch) and _is_finite(accum) else None
    rows = [
        ("stage", stage_text(config)),
        ("LoRA rank r", _num(r)),
        ("alpha", _num(alpha) + (f" (scale {_num(scale, 3)})" if scale is not None else "")),
        ("dropout", _num(g("lora.dropout"))),
        ("target modules", f"`{targets}`" if targets else "—"),
        ("init", f"{g('lora.init') or 'default'}" + (f" + {', '.join(variants)}" if variants else "")),
        ("bias", g("lora.bias") or "none"),
        ("LoRA+ lr ratio", _num(g("lora.loraplus_lr_ratio")) if g("lora.loraplus_lr_ratio") else "off"),
        ("quantization", quant_text(config)),
        ("learning rate", _num(g("train.learning_rate"))),
        ("scheduler", f"{g('train.lr_scheduler')}, warmup {_num(g('train.warmup_ratio'))}"),
        (
            "batch",
            f"{_num(batch)} × {_num(accum)} accumulation" + (f" = {_num(effective)} per update" if effective else ""),
        ),
        ("length", f"max_steps {max_steps}" if max_steps else f"{_num(g('train.epochs'))} epochs"),
        ("optimizer", f"{g('train.optimizer')}, weight decay {_num(g('train.weight_decay'))}"),
        ("max grad norm", _num(g("train.max_grad_norm"))),
        ("compute type", f"{g('train.compute_type')} on {g('train.device') or 'auto'}"),
        ("gradient checkpointing", "on" if g("train.gradient_checkpointing") else "off"),
        ("seed", _num(g("train.seed"))),
    ]
    return "## Hyperparameters\n\n" + _table(("Setting", "Value"), rows)


def quant_text(config: dict) -> str:
    mode = _get(config, "quant.mode") or "none"
    if mode == "4bit":
        double = ", double quant" if _get(config, "quant.double_quant") else ""
        return f"4-bit {_get(config, 'quant.quant_type')}{double}, compute {_get(config, 'quant.compute_dtype')}"
    return "8-bit" if mode == "8bit" else mode


def training_section(run: Run, metrics: Sequence[Metric], run_json: dict | None) -> str:
    rj = run_json or {}
    evals = metric_points(metrics, "eval_loss")
    memory = [p[1] for p in metric_points(metrics, "memory_mb")]
    peak = rj.get("peak_memory_mb") if _is_finite(rj.get("peak_memory_mb")) else (max(memory) if memory else None)
    speeds = [p[1] for p in metric_points(metrics, "tokens_per_s")]
    speed = rj.get("tokens_per_s") if _is_finite(rj.get("tokens_per_s")) else (speeds[-1] if speeds else None)
    seconds = rj.get("seconds") if _is_finite(rj.get("seconds")) else run.duration_s
    steps = rj.get("global_step", run.step)
    rows = [
        ("status", run.status.value),
        ("steps", f"{_int(steps)}" + (f" of {run.total_steps}" if run.total_steps else "")),
        ("final train loss", _num(rj.get("final_loss", run.final_loss), 4)),
        ("final eval loss", _num(evals[-1][1], 4) if evals else "—"),
        ("time", _duration(seconds)),
        ("tokens / s", _num(speed, 0) if speed is not None else "—"),
        ("real tokens", _int(rj.get("real_tokens"))),
        ("peak memory", f"{peak:,.0f} MB" if peak is not None else "—"),
        ("trainable parameters", _int(rj.get("trainable_parameters"))),
        ("started", iso(run.started_at) or "—"),
        ("finished", iso(run.finished_at) or "—"),
    ]
    return "## Training\n\n" + _table(("Measure", "Value"), rows)


def curves_section(charts: Sequence[Chart], image_dir: str = RunDir.CARD_IMAGES) -> str:
    if not charts:
        return "## Curves\n\nNo metrics were logged."
    prefix = f"{image_dir.rstrip('/')}/" if image_dir else ""
    return "## Curves\n\n" + "\n\n".join(f"![{c.alt}]({prefix}{c.file})" for c in charts)


# (label, key, lower is better)
_EVAL_ROWS = (
    ("loss", ("loss",), True),
    ("perplexity", ("perplexity",), True),
    ("exact match", ("generation", "exact_match"), False),
    ("chrF", ("generation", "chrf"), False),
    ("ROUGE-L", ("generation", "rouge_l"), False),
    ("preference accuracy", ("preference", "accuracy"), False),
    ("preference margin (nats)", ("preference", "margin"), False),
)


def eval_value(report: dict, key: tuple[str, ...], side: str) -> float | None:
    """report["loss"]["base"] or report["generation"]["base"]["chrf"]; None when absent or not a number."""
    node: Any = report.get(key[0])
    # generation keeps the side above the metric; preference (like loss) below it
    path = (key[1], side) if key[0] == "preference" else (side, *key[1:])
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return float(node) if _is_finite(node) else None


def evaluation_section(report: dict | None) -> str:
    if not report:
        return "## Evaluation\n\nNot evaluated yet."
    rows = []
    for label, key, lower_better in _EVAL_ROWS:
        base, adapter = eval_value(report, key, "base"), eval_value(report, key, "adapter")
        if base is None and adapter is None:
            continue
        change = "—"
        if base is not None and adapter is not None:
            delta = adapter - base
            better = delta < 0 if lower_better else delta > 0
            change = f"{delta:+.4g}" + (" (better)" if better else " (worse)" if delta else "")
        rows.append((label + (" ↓" if lower_better else " ↑"), _num(base, 4), _num(adapter, 4), change))
    lines = ["## Evaluation", ""]
    what = [f"on {report['dataset']}" if report.get("dataset") else None]
    if isinstance(report.get("samples"), int):
        what.append(f"{report['samples']} samples")
    gen = report.get("generation") if isinstance(report.get("generation"), dict) else {}
    if gen.get("prompts"):
        what.append(f"generation on {gen['prompts']} prompts, up to {gen.get('max_new_tokens', '?')} new tokens")
    if report.get("created_at"):
        what.append(f"at {iso(report['created_at'])}")
    lines += ["Base model vs adapter " + ", ".join(w for w in what if w) + ".", ""]
    lines.append(_table(("Metric", "Base", "Adapter", "Change"), rows) if rows else "No metrics in the report.")
    examples = [e for e in report.get("examples") or [] if isinstance(e, dict)][:MAX_EXAMPLES]
    for i, ex in enumerate(examples, 1):
        lines += ["", f"### Example {i}", ""]
        for label, key in (("Prompt", "prompt"), ("Reference", "reference"), ("Base", "base"), ("Adapter", "adapter")):
            if ex.get(key) is not None:
                lines += [f"**{label}**", "", _fenced(str(ex[key])), ""]
        lines.pop()
    return "\n".join(lines)


def notes_section(run: Run, warnings: list[str]) -> str:
    notes = list(dict.fromkeys(w.strip() for w in warnings if w and w.strip()))  # once each, in order
    error = (run.error or "").split(LOG_TAIL_MARK)[0].strip()  # the worker appends the log's last lines
    if error and error not in notes:
        notes.insert(0, error)
    if not notes:
        return ""
    return "## Notes\n\n" + "\n".join(f"- {_inline(n)}" for n in notes)


def reproduce_section(run: Run, command: str, config: dict, base: BaseModelInfo, has_adapter: bool) -> str:
    adapter = str(RunDir.of(run).adapter)
    lines = [
        "## How to reproduce",
        "",
        "Train again with the same config (the datasets must be registered under the same names; the sha256 "
        "above identifies the exact files):",
        "",
        _fenced(command, "bash"),
        "",
        f"<details><summary>{RunDir.CONFIG}</summary>",
        "",
        _fenced(yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip(), "yaml"),
        "",
        "</details>",
    ]
    if not has_adapter:
        return "\n".join(lines)
    base_ref = base.path if base.kind != "hub" else base.hub_id
    comment = f"  # or {BUNDLED_HUB_ID} (the hub's full-precision weights)" if base.kind == "bundled" else ""
    snippet = "\n".join(
        [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base_ref)}){comment}",
            f"model = PeftModel.from_pretrained(base, {json.dumps(adapter)})  # this folder",
            f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(adapter)})",
        ]
    )
    lines += ["", "Load the adapter (plain PEFT format):", "", _fenced(snippet, "python")]
    return "\n".join(lines)


# -- writing ----------------------------------------------------------------------------------------


def write_card(home: Path, run_id: str) -> Path:
    """Write the card of a run: beside its adapter (<adapter>/README.md, images in <adapter>/card/), or in
    RUN_DIR/card/ when no adapter exists. Returns the README path."""
    from studio.core.workspace import db_path

    home = Path(home)
    if not db_path(home).is_file():
        raise CardError(f"No workspace at {home} (no studio.db). Set STUDIO_HOME to the studio's workspace.")
    store = Store(db_path(home))
    try:
        run = store.get_run(run_id)
        metrics = store.metrics(run_id)
        warnings = [e.message for e in store.events(run_id) if e.level in ("warning", "error")]
    except RunNotFound as err:
        raise CardError(f"No run '{run_id}'. List runs with `studio runs` and pass a run id.") from err
    finally:
        store.close()
    folder = RunDir.of(run)
    has_adapter = folder.has_adapter()
    run_json = _read_json(folder.run_json) if has_adapter else None  # absent: an older studio
    config = (run_json or {}).get("config") or run.config
    card = render_card(
        run,
        metrics,
        run_json,
        _read_json(folder.eval_latest),
        dataset_entries(home, _get(config, "data.datasets") or []),
        reproduce_command(folder.path),
        warnings,
        image_dir=RunDir.CARD_IMAGES if has_adapter else "",
        has_adapter=has_adapter,
    )
    write_images(folder.card_images(has_adapter), card_charts(metrics))
    return atomic_write(folder.card_folder(has_adapter) / RunDir.CARD, card)


def dataset_entries(home: Path, names: Sequence[str]) -> list[dict]:
    """Registry entries of the run's datasets; one removed since is listed as missing, not an error."""
    from studio.data import DataError, DatasetRegistry

    registry = DatasetRegistry(home)
    out: list[dict] = []
    for name in names:
        try:
            out.append(registry.get(name).to_dict())
        except (DataError, KeyError, OSError, ValueError):
            out.append({"name": name, "missing": True})
    return out


def write_images(folder: Path, charts: Sequence[Chart]) -> None:
    """Write the charts and drop SVGs of an earlier card that this one no longer shows."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = {c.file for c in charts}
    for chart in charts:
        atomic_write(folder / chart.file, chart.svg)
    for old in folder.glob("*.svg"):
        if old.name not in keep:
            old.unlink(missing_ok=True)


def _read_json(path: Path) -> dict | None:
    """A JSON object from disk, or None when it is missing or unreadable (a card still gets written)."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


# -- small formatting helpers -----------------------------------------------------------------------


def _get(config: dict | None, dotted: str) -> Any:
    node: Any = config or {}
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _clean(value: float, step: float) -> float:
    """Round away float noise (0.30000000000000004) at a precision finer than the step."""
    return round(value, max(0, 3 - math.floor(math.log10(step)))) + 0.0


def _num(value: Any, digits: int | None = None) -> str:
    """A number for a table: `digits` decimals when given; else compact (2e-4, 0.05, 16)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not _is_finite(value):
        return "—" if value is None else str(value)
    if digits is not None:
        return f"{value:,.{digits}f}"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value)}"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.6g}"


def _int(value: Any) -> str:
    return f"{int(value):,}" if _is_finite(value) else "—"


def _duration(seconds: Any) -> str:
    if not _is_finite(seconds):
        return "—"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _inline(text: str) -> str:
    """One line of user text made safe inside Markdown (no raw HTML, no line breaks)."""
    return " ".join(str(text).split()).replace("<", "&lt;").replace(">", "&gt;")


def _cell(value: Any) -> str:
    return _inline(str(value)).replace("|", "\\|") or "—"


def _table(header: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fenced(text: str, lang: str = "") -> str:
    """A code block whose fence is longer than any backtick run in the text, so the text cannot end it."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"
