"""Altair chart builders for the dashboard: titled axes with units, legends, tooltips.

Every builder takes a tidy DataFrame from a :class:`~dashboard.sources.Snapshot` and
returns an ``alt.Chart`` (or None when there is nothing to draw). NaN values are gaps;
±Inf never reaches a chart (sources store it as a non-finite marker instead).

Names from users (penalties, terms, events) reach the page only as data: Vega draws
axis labels, legends and tooltips as text, never as Markdown or HTML. Titles are fixed.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from penwatch.schema import thresholds

STATUS_COLORS = alt.Scale(
    domain=["ok", "dominating", "conflicting"], range=["#4c78a8", "#e45756", "#f58518"]
)
KIND_COLORS = alt.Scale(
    domain=["nonfinite", "alert", "info"], range=["#e45756", "#f58518", "#72b7b2"]
)
HEIGHT = 260
LEGEND = {"orient": "bottom", "direction": "vertical", "columns": 1, "labelLimit": 0}
"""Legends below the chart, one entry per line, every label whole (``labelLimit=0``: no
truncation): a legend grows downwards, never past the chart's width."""
LEGEND_ROW = 17
"""Pixels per legend entry (one per line)."""
AXIS = alt.Axis(labelLimit=0, labelOverlap=False)
"""A category axis that shows every label whole."""


FRAME = 90
"""Pixels of a chart's title and x axis (ticks, labels, axis title)."""


def _height(plot: int, *legends: int) -> int:
    """The chart's height for a plot area of ``plot`` pixels.

    Streamlit fits the whole view into the height (``autosize: fit, contains:
    padding``): title, axes and legends included. So the title and x axis
    (:data:`FRAME`) and each legend below the plot (its title and one line per entry)
    are added to ``plot``; legends below one chart sit side by side, the longest counts.
    """
    return plot + FRAME + (40 + LEGEND_ROW * max(legends) if legends else 0)


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    return df.replace([np.inf, -np.inf], np.nan)


def _step_axis(width: int) -> alt.X:
    title = "step" if width == 1 else f"step (min–max per {width} steps)"
    return alt.X("step:Q", title=title)


def contributions(df: pd.DataFrame, width: int) -> alt.Chart | None:
    """Stacked area of weighted penalty contributions over steps."""
    if df.empty:
        return None
    return (
        alt.Chart(_clean(df), title="Weighted penalty contributions (stacked)")
        .mark_area(opacity=0.85, interpolate="linear")
        .encode(
            x=_step_axis(width),
            y=alt.Y("value:Q", stack="zero", title="weight × penalty (loss units)"),
            color=alt.Color("penalty:N", title="penalty", legend=alt.Legend(**LEGEND)),
            order=alt.Order("penalty:N"),
            tooltip=["step:Q", "penalty:N", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(height=_height(HEIGHT, df["penalty"].nunique()))
    )


def shares(df: pd.DataFrame) -> alt.Chart | None:
    """Each penalty's signed share ``w_i / Σ|w_j|`` (latest), as horizontal bars.

    A bonus term (negative weighted value) draws to the left of zero; magnitudes sum to 1.
    """
    if df.empty:
        return None
    low = -1 if (df["share"] < 0).any() else 0
    return (
        alt.Chart(_clean(df), title="Share of total penalty (latest)")
        .mark_bar()
        .encode(
            x=alt.X(
                "share:Q",
                title="w_i / Σ|w_j| (negative: a bonus)",
                axis=alt.Axis(format="%"),
                scale=alt.Scale(domain=[low, 1]),
            ),
            y=alt.Y("penalty:N", sort="-x", title=None, axis=AXIS),
            color=alt.Color("penalty:N", legend=None),
            tooltip=[
                "penalty:N",
                alt.Tooltip("share:Q", format=".1%"),
                alt.Tooltip("weighted:Q", format=".4g", title="weighted value"),
            ],
        )
        .properties(height=_height(max(HEIGHT, 24 * df["penalty"].nunique())))
    )


def losses(df: pd.DataFrame, nonfinite: pd.DataFrame, width: int) -> alt.Chart | None:
    """Base loss and total penalty over steps; red rules where values went non-finite."""
    if df.empty:
        return None
    lines = (
        alt.Chart(_clean(df), title="Base loss and total penalty")
        .mark_line()
        .encode(
            x=_step_axis(width),
            y=alt.Y("value:Q", title="loss (loss units)"),
            color=alt.Color("series:N", title=None, legend=alt.Legend(**LEGEND)),
            tooltip=["step:Q", "series:N", alt.Tooltip("value:Q", format=".4g")],
        )
    )
    if nonfinite.empty:
        return lines.properties(height=_height(HEIGHT, df["series"].nunique()))
    rules = (
        alt.Chart(nonfinite)
        .mark_rule(color="#e45756", strokeDash=[4, 2])
        .encode(
            x="step:Q",
            tooltip=[
                alt.Tooltip("step:Q", title="non-finite at step"),
                alt.Tooltip("count:Q", title="non-finite values"),
            ],
        )
    )
    return alt.layer(lines, rules).properties(height=_height(HEIGHT, df["series"].nunique()))


_GRAD_TITLES = {
    "grad_norm": ("Gradient norm per term (log scale)", "‖g_i‖ (log scale)"),
    "grad_share": ("Gradient share per term", "⟨g_i, g⟩ / ‖g‖² (1 = whole update)"),
    "grad_cosine": ("Cosine to the base-loss gradient", "cos(g_i, g_base)"),
}


def grads(
    df: pd.DataFrame, quantity: str, width: int, highlight: dict[str, str]
) -> alt.Chart | None:
    """One gradient quantity per term over steps; highlighted terms drawn thick.

    Args:
      df: ``step, term, quantity, value``.
      quantity: ``grad_norm`` (log scale), ``grad_share`` or ``grad_cosine``.
      width: downsampling width (axis title).
      highlight: term -> status (``dominating``/``conflicting``) drawn emphasised.
    """
    part = _clean(df[df["quantity"] == quantity])
    if quantity == "grad_norm":
        part = part.assign(value=part["value"].where(part["value"] > 0))
    if part.empty or part["value"].isna().all():
        return None
    part = part.assign(
        emphasis=part["term"].map(lambda t: highlight.get(t, "ok")),
    )
    title, ytitle = _GRAD_TITLES[quantity]
    scale = alt.Scale(type="log") if quantity == "grad_norm" else alt.Scale(zero=False)
    if quantity == "grad_cosine":
        scale = alt.Scale(domain=[-1, 1])
    chart = (
        alt.Chart(part, title=title)
        .mark_line()
        .encode(
            x=_step_axis(width),
            y=alt.Y("value:Q", title=ytitle, scale=scale),
            color=alt.Color("term:N", title="term", legend=alt.Legend(**LEGEND)),
            strokeWidth=alt.condition(alt.datum.emphasis != "ok", alt.value(3.5), alt.value(1.2)),
            strokeDash=alt.condition(
                alt.datum.term == "base", alt.value([5, 3]), alt.value([1, 0])
            ),
            tooltip=[
                "step:Q",
                "term:N",
                alt.Tooltip("value:Q", format=".4g"),
                alt.Tooltip("emphasis:N", title="status"),
            ],
        )
    )
    layers = [chart]
    if quantity in ("grad_share", "grad_cosine"):
        level = (
            thresholds.DOMINANCE_SHARE if quantity == "grad_share" else thresholds.CONFLICT_COSINE
        )
        layers.append(
            alt.Chart(pd.DataFrame({"y": [level]}))
            .mark_rule(color="#999", strokeDash=[2, 2])
            .encode(y="y:Q")
        )
    return alt.layer(*layers).properties(height=_height(HEIGHT, part["term"].nunique()))


def terms(df: pd.DataFrame) -> alt.Chart | None:
    """Latest gradient share per term, bars coloured by status (dominating/conflicting)."""
    if df.empty or df["grad_share"].isna().all():
        return None
    return (
        alt.Chart(_clean(df), title="Latest gradient share per term")
        .mark_bar()
        .encode(
            x=alt.X("grad_share:Q", title="share of the update (⟨g_i, g⟩ / ‖g‖²)"),
            y=alt.Y("term:N", sort="-x", title=None, axis=AXIS),
            color=alt.Color(
                "status:N", scale=STATUS_COLORS, title="status", legend=alt.Legend(**LEGEND)
            ),
            tooltip=[
                "term:N",
                "status:N",
                alt.Tooltip("grad_share:Q", format=".3f"),
                alt.Tooltip("grad_cosine:Q", format=".3f"),
                alt.Tooltip("grad_norm:Q", format=".3g"),
            ],
        )
        .properties(height=_height(max(HEIGHT, 24 * len(df)), len(STATUS_COLORS.domain)))
    )


def timeline(events: pd.DataFrame, steps: tuple[float, float] | None = None) -> alt.Chart | None:
    """Non-finite detections and alerts as marks along the steps.

    Args:
      events: ``step, kind, name, severity, message, process``.
      steps: the run's ``(first, last)`` step, so marks sit in the run's context.
    """
    if events.empty:
        return None
    domain = None
    if steps is not None:
        domain = [min(steps[0], events["step"].min()), max(steps[1], events["step"].max())]
    return (
        alt.Chart(events, title="Non-finite events and alerts")
        .mark_point(filled=True, size=90)
        .encode(
            x=alt.X(
                "step:Q", title="step", scale=alt.Scale(domain=domain) if domain else alt.Undefined
            ),
            y=alt.Y("name:N", title=None, axis=AXIS),
            color=alt.Color("kind:N", scale=KIND_COLORS, title="kind", legend=alt.Legend(**LEGEND)),
            shape=alt.Shape("severity:N", title="severity", legend=alt.Legend(**LEGEND)),
            tooltip=["step:Q", "kind:N", "name:N", "severity:N", "message:N", "process:Q"],
        )
        .properties(
            height=_height(
                max(60, 40 * events["name"].nunique()),
                len(KIND_COLORS.domain),
                events["severity"].nunique(),
            )
        )
    )


def durations(df: pd.DataFrame) -> alt.Chart | None:
    """Device-time percentiles (p50/p90/p99, ms) over the recent steps."""
    if df.empty:
        return None
    return (
        alt.Chart(_clean(df), title="Device time per step, percentiles (recent steps)")
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("ms:Q", title="duration (ms, log scale)", scale=alt.Scale(type="log")),
            color=alt.Color(
                "percentile:N",
                title=None,
                sort=["p50", "p90", "p99"],
                legend=alt.Legend(**LEGEND),
            ),
            tooltip=["step:Q", "percentile:N", alt.Tooltip("ms:Q", format=".3g")],
        )
        .properties(height=_height(HEIGHT, df["percentile"].nunique()))
    )


def compare(df: pd.DataFrame, title: str, ytitle: str, *, log: bool = False) -> alt.Chart | None:
    """Several runs overlaid: ``step, run, series, value``; colour = run, dash = series.

    Args:
      df: one row per point; ``series`` names the quantity within a run (a penalty, a
        percentile, ``base loss``).
      title: the chart title (fixed text).
      ytitle: the y-axis title with units.
      log: a log-scale y axis (non-positive values are dropped).
    """
    df = _clean(df).dropna(subset=["value"])
    if log:
        df = df[df["value"] > 0]
    if df.empty:
        return None
    scale = alt.Scale(type="log") if log else alt.Scale(zero=False)
    return (
        alt.Chart(df, title=title)
        .mark_line()
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("value:Q", title=ytitle, scale=scale),
            color=alt.Color("run:N", title="run", legend=alt.Legend(**LEGEND)),
            strokeDash=alt.StrokeDash("series:N", title="series", legend=alt.Legend(**LEGEND)),
            detail="series:N",
            tooltip=["run:N", "series:N", "step:Q", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(height=_height(HEIGHT, df["run"].nunique(), df["series"].nunique()))
    )


def compare_bars(df: pd.DataFrame, title: str, xtitle: str) -> alt.Chart | None:
    """Latest figures of several runs side by side: ``run, name, value`` (e.g. shares)."""
    df = _clean(df).dropna(subset=["value"])
    if df.empty:
        return None
    return (
        alt.Chart(df, title=title)
        .mark_bar()
        .encode(
            x=alt.X("value:Q", title=xtitle, axis=alt.Axis(format="%")),
            y=alt.Y("name:N", title=None, axis=AXIS),
            yOffset="run:N",
            color=alt.Color("run:N", title="run", legend=alt.Legend(**LEGEND)),
            tooltip=["run:N", "name:N", alt.Tooltip("value:Q", format=".1%")],
        )
        .properties(height=_height(max(HEIGHT, 12 * len(df)), df["run"].nunique()))
    )
