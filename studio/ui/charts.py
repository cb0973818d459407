"""Plotly figure builders for the Train and Runs tabs: pure functions from store metrics to figures.

They read `Metric` rows (or plain objects with the same attributes) and never touch the store, so the
UI timer stays cheap and the figures are testable without a browser.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import plotly.graph_objects as go

from studio.core.store import Metric

EMA_WEIGHT = 0.6  # TensorBoard's default slider value: visible trend, still responsive on short runs
_LAYOUT = {"height": 280, "margin": {"l": 50, "r": 20, "t": 40, "b": 40}, "template": "plotly_white"}


def ema(values: Sequence[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's so the first points are not pulled to 0."""
    out: list[float] = []
    last, norm = 0.0, 0.0
    for value in values:
        last = weight * last + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def series(metrics: Iterable[Metric], name: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric, skipping the rows where it was not logged."""
    steps, values = [], []
    for m in metrics:
        value = getattr(m, name)
        if value is not None:
            steps.append(m.step)
            values.append(value)
    return steps, values


def empty_figure(title: str, note: str = "No data yet") -> go.Figure:
    fig = go.Figure(layout={**_LAYOUT, "title": title})
    fig.add_annotation(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _figure(title: str, ytitle: str) -> go.Figure:
    fig = go.Figure(layout={**_LAYOUT, "title": title})
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text=ytitle)
    return fig


def loss_figure(metrics: Sequence[Metric], weight: float = EMA_WEIGHT) -> go.Figure:
    """Train loss (raw, faint), its EMA, and eval loss as markers."""
    steps, loss = series(metrics, "loss")
    eval_steps, eval_loss = series(metrics, "eval_loss")
    if not steps and not eval_steps:
        return empty_figure("Loss")
    fig = _figure("Loss", "loss")
    fig.add_trace(go.Scatter(x=steps, y=loss, name="train loss", mode="lines", opacity=0.35))
    fig.add_trace(go.Scatter(x=steps, y=ema(loss, weight), name="smoothed", mode="lines"))
    fig.add_trace(go.Scatter(x=eval_steps, y=eval_loss, name="eval loss", mode="lines+markers"))
    return fig


def metric_figure(metrics: Sequence[Metric], name: str, title: str, ytitle: str) -> go.Figure:
    """One metric over steps (learning rate, grad norm, tokens/s, memory)."""
    steps, values = series(metrics, name)
    if not steps:
        return empty_figure(title)
    fig = _figure(title, ytitle)
    fig.add_trace(go.Scatter(x=steps, y=values, name=title, mode="lines+markers"))
    return fig


# (metric field, title, y axis) for the small charts under the loss chart, in display order.
SMALL_CHARTS = (
    ("learning_rate", "Learning rate", "lr"),
    ("grad_norm", "Grad norm", "norm"),
    ("tokens_per_s", "Tokens/s", "tokens/s"),
    ("memory_mb", "Memory", "MB"),
)


def run_figures(metrics: Sequence[Metric]) -> list[go.Figure]:
    """The Train tab's charts: loss first, then SMALL_CHARTS in order, then the preference chart."""
    return [loss_figure(metrics), *(metric_figure(metrics, *spec) for spec in SMALL_CHARTS), preference_figure(metrics)]


# (metric field, trace name, on the accuracy axis) of the preference chart.
PREFERENCE_TRACES = (
    ("reward_chosen", "reward chosen", False),
    ("reward_rejected", "reward rejected", False),
    ("reward_margin", "margin", False),
    ("kl", "KL (KTO)", False),
    ("reward_accuracy", "accuracy", True),
    ("eval_reward_margin", "eval margin", False),
    ("eval_reward_accuracy", "eval accuracy", True),
)


def has_preference_metrics(metrics: Sequence[Metric]) -> bool:
    return any(getattr(m, name) is not None for m in metrics for name, _, _ in PREFERENCE_TRACES)


def preference_figure(metrics: Sequence[Metric]) -> go.Figure:
    """A preference run's rewards of chosen and rejected answers, their margin (and KTO's KL) on the left
    axis, the share of pairs ranked right (accuracy) on the right one, from 0 to 1."""
    if not has_preference_metrics(metrics):
        return empty_figure("Rewards", "Preference runs (DPO, KTO, ORPO) chart their rewards here")
    fig = _figure("Rewards and accuracy", "implicit reward")
    fig.update_layout(yaxis2={"title": "accuracy", "overlaying": "y", "side": "right", "range": [0, 1.05]})
    for name, label, on_accuracy in PREFERENCE_TRACES:
        steps, values = series(metrics, name)
        if steps:
            mode = "lines+markers" if name.startswith("eval_") else "lines"
            fig.add_trace(go.Scatter(x=steps, y=values, name=label, mode=mode, yaxis="y2" if on_accuracy else "y"))
    return fig


def overlay_figure(curves: dict[str, Sequence[Metric]], smoothed: bool = True) -> go.Figure:
    """One loss trace per run (smoothed by default so runs of different noise compare fairly)."""
    if not curves:
        return empty_figure("Loss by run", "Select runs to compare")
    fig = _figure("Loss by run", "loss")
    for label, metrics in curves.items():
        steps, loss = series(metrics, "loss")
        fig.add_trace(go.Scatter(x=steps, y=ema(loss) if smoothed else loss, name=label, mode="lines"))
    return fig


def sweep_figure(curves: dict[str, Sequence[Metric]]) -> go.Figure:
    """A sweep's runs on one chart: eval loss (what the pick is made on) as lines with markers, and the
    smoothed train loss dotted in the same colour, so a run that learns the train set but not the eval
    split stands out."""
    if not curves:
        return empty_figure("Sweep: eval loss by run", "Pick a sweep")
    fig = _figure("Sweep: eval loss by run", "loss")
    palette = ("#f97316", "#2563eb", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777")
    for i, (label, metrics) in enumerate(curves.items()):
        color = palette[i % len(palette)]
        eval_steps, eval_loss = series(metrics, "eval_loss")
        steps, loss = series(metrics, "loss")
        if eval_steps:
            fig.add_trace(
                go.Scatter(x=eval_steps, y=eval_loss, name=f"{label} eval", mode="lines+markers", line={"color": color})
            )
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=ema(loss),
                name=f"{label} train",
                mode="lines",
                line={"color": color, "dash": "dot"},
                opacity=0.6,
            )
        )
    return fig
