"""penwatch live dashboard: ``streamlit run penwatch/dashboard/app.py [-- --db PATH]``.

Reads a penwatch SQLite store (default; ``--db`` or ``PENWATCH_DB``) or a Prometheus
server (``--prometheus URL`` or ``PENWATCH_PROMETHEUS_URL``) and refreshes itself every
few seconds (``--refresh`` / ``PENWATCH_REFRESH_SECONDS``) with ``st.fragment``, reading
only what is new. It never creates metrics, tracers or writers: Streamlit re-runs this
script top to bottom, and all state lives in the per-session source.

The run picker lists each run's status; the page says when the selected run is not live
(finished, stopped, failed, or crashed: no heartbeat for ``--stale-after`` /
``PENWATCH_STALE_AFTER`` seconds). Text from users (run, pipeline, penalty and metric
names, event messages) is shown literally: every piece of it that goes into Markdown
passes through :func:`penwatch.dashboard._text.md_escape`.
"""

from __future__ import annotations

import logging
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[2]  # a checkout run without installing
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from penwatch.dashboard import charts, sources  # noqa: E402
from penwatch.dashboard._runs import age, status_note  # noqa: E402
from penwatch.dashboard._text import md_escape  # noqa: E402
from penwatch.schema import thresholds  # noqa: E402

logger = logging.getLogger("penwatch.dashboard")

st.set_page_config(page_title="penwatch", page_icon="📉", layout="wide")

try:
    CONFIG = sources.Config.from_env(sys.argv[1:])
except ValueError as exc:
    st.error(md_escape(exc))
    st.stop()


def _fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None:
        return "–"
    return format(value, spec)


def _duration(ms: float) -> str:
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1000:.3g} s"


def _headline(snap: sources.Snapshot) -> None:
    h = snap.headline
    cols = st.columns(6)
    cols[0].metric("Step", "–" if h.step is None else f"{h.step:,}")
    cols[1].metric("Base loss", _fmt(h.loss))
    cols[2].metric("Total penalty", _fmt(h.total))
    cols[3].metric(
        "Penalty share of loss",
        "–" if h.penalty_share is None else f"{100 * h.penalty_share:.1f} %",
        help="|total penalty| / (|base loss| + |total penalty|) at the latest step",
    )
    cols[4].metric(
        "Non-finite values", f"{h.nonfinite:,}", help="NaN/Inf metric values detected so far"
    )
    cols[5].metric("Open alerts", f"{h.open_alerts}", help=f"{h.alerts} fired in total")
    where = "all processes" if snap.process is None else f"process {snap.process}"
    sampling = (
        "every step drawn" if snap.width == 1 else (f"downsampled: min–max per {snap.width} steps")
    )
    live = "live" if h.live else "not live"
    st.caption(
        f"run **{md_escape(snap.run)}** · {where} · status **{md_escape(h.status)}** ({live}) · "
        f"last update {age(h.updated_at)} · {sampling}"
    )


def _warnings(snap: sources.Snapshot) -> dict[str, str]:
    highlight = {}
    for row in snap.terms.itertuples():
        if row.status != "ok":
            highlight[row.term] = row.status
            if row.status == "dominating":
                st.warning(
                    f"**{md_escape(row.term)}** dominates the gradient: share "
                    f"{row.grad_share:.2f} of the update (> {thresholds.DOMINANCE_SHARE:g})."
                )
            else:
                st.warning(
                    f"**{md_escape(row.term)}** conflicts with the task loss: cosine "
                    f"{row.grad_cosine:.2f} to the base-loss gradient "
                    f"(< {thresholds.CONFLICT_COSINE:g})."
                )
    for report in snap.reports[:1]:
        first = report.get("nonfinite") or []
        leaves = report.get("leaves") or []
        if first:
            f0 = first[0]
            text = (
                f"Non-finite at step {report['step']}: first offender "
                f"**{md_escape(f0['key'])}** ({md_escape(f0['kind'])})"
            )
            if leaves:
                text += "; leaves: " + ", ".join(
                    f"**{md_escape(lf['tree'] + lf['path'])}** "
                    f"(nan {lf['nan_count']}, inf {lf['inf_count']})"
                    for lf in leaves[:3]
                )
            st.error(text)
    return highlight


def _chart(chart: object, empty: str) -> None:
    if chart is None:
        st.info(empty)
    else:
        st.altair_chart(chart, width="stretch")


def _views(snap: sources.Snapshot) -> None:
    highlight = _warnings(snap)
    left, right = st.columns([2, 1])
    with left:
        _chart(charts.contributions(snap.contributions, snap.width), "No penalties recorded yet.")
    with right:
        _chart(charts.shares(snap.shares), "No penalty shares yet.")
    left, right = st.columns([2, 1])
    with left:
        _chart(
            charts.losses(snap.losses, snap.nonfinite_steps, snap.width), "No loss recorded yet."
        )
    with right:
        _chart(charts.durations(snap.durations), "No step durations recorded yet.")
        if snap.duration_summary:
            d = snap.duration_summary
            c = st.columns(3)
            for col, q in zip(c, ("p50", "p90", "p99"), strict=True):
                col.metric(
                    f"{q} device time",
                    _duration(d[q]),
                    help=(
                        f"over the last {int(d['steps'])} recorded steps; a step's device time "
                        "is from max(its dispatch, the previous step ready) until its "
                        "results were ready, not the time it queued"
                    ),
                )
    st.subheader("Gradients per term" if snap.grad_wrt == "params" else "Gradient norms")
    if snap.grad_wrt is None:
        st.info(
            "No gradient diagnostics recorded (run them with the trainer's diagnostics, "
            "or `track_grad_norms=True`)."
        )
    else:
        cols = st.columns(3 if snap.grad_wrt == "params" else 1)
        quantities = ("grad_norm", "grad_share", "grad_cosine")[: len(cols)]
        for col, q in zip(cols, quantities, strict=True):
            with col:
                _chart(charts.grads(snap.grads, q, snap.width, highlight), f"No {q} yet.")
        if snap.grad_wrt == "params":
            left, right = st.columns([1, 2])
            with left:
                _chart(charts.terms(snap.terms), "No gradient shares yet.")
            with right:
                st.dataframe(snap.terms, hide_index=True, width="stretch")
    st.subheader("Non-finite events and alerts")
    if snap.events.empty:
        st.success("No non-finite values and no alerts so far.")
    else:
        span = None
        if len(snap.losses):
            span = (float(snap.losses["step"].min()), float(snap.losses["step"].max()))
        _chart(charts.timeline(snap.events, span), "")
        recent = snap.events.sort_values("step", ascending=False).head(50)
        st.dataframe(recent.drop(columns=["wall_time"]), hide_index=True, width="stretch")


def _run_label(run: sources.RunChoice) -> str:
    """A picker option: plain text (selectbox options are not Markdown)."""
    step = "no steps yet" if run.last_step is None else f"step {run.last_step:,}"
    return f"{run.name} · {run.status} · {step}"


def _pick(runs: list[sources.RunChoice]) -> tuple[sources.RunChoice, int | None]:
    names = [r.name for r in runs]
    if st.session_state.get("penwatch_run") not in names:
        st.session_state["penwatch_run"] = names[0]
    by_name = {r.name: r for r in runs}
    left, right = st.columns([2, 1])
    with left:
        name = st.selectbox(
            "Run", names, key="penwatch_run", format_func=lambda n: _run_label(by_name[n])
        )
    choice = by_name[name]
    process = None
    if len(choice.processes) > 1:
        options = [None, *choice.processes]

        def label(p: int | None) -> str:
            return "all processes" if p is None else f"process {p} · {choice.of(p)[0]}"

        if st.session_state.get("penwatch_process", None) not in options:
            st.session_state["penwatch_process"] = None
        with right:
            process = st.selectbox("Process", options, key="penwatch_process", format_func=label)
    return choice, process


def _status(choice: sources.RunChoice, process: int | None) -> None:
    """Say plainly when the selected run is not live (or a process of it has ended)."""
    note = status_note(choice, process, stale_after=CONFIG.stale_after)
    if note is not None:
        level, text = note
        {"info": st.info, "warning": st.warning, "error": st.error}[level](text)


@st.fragment(run_every=CONFIG.refresh_seconds)
def live() -> None:
    """The whole page body; Streamlit re-runs it every ``refresh_seconds``."""
    source = sources.session_source(st.session_state, CONFIG)
    try:
        runs = source.runs()
    except sources.SourceUnavailable as exc:
        st.info(md_escape(exc))
        return
    except Exception as exc:  # a store mid-write, a network error: say so, retry next tick
        logger.warning("dashboard: reading %s failed: %s", source.label, exc)
        st.warning(
            md_escape(f"Could not read {source.label} this time ({type(exc).__name__}: {exc})")
            + "; retrying."
        )
        return
    if not runs:
        st.info(
            f"{md_escape(source.label)} has no runs yet. Start one (`penwatch demo`); this page "
            "refreshes by itself."
        )
        return
    choice, process = _pick(runs)
    run = choice.name
    _status(choice, process)
    try:
        snap = source.snapshot(run, process)
    except Exception as exc:
        logger.warning("dashboard: snapshot of %r failed: %s", run, exc, exc_info=True)
        st.warning(
            f"Could not read run **{md_escape(run)}** this time "
            f"({md_escape(f'{type(exc).__name__}: {exc}')}); retrying."
        )
        return
    if snap.empty:
        st.info(f"Run **{md_escape(run)}** has not recorded a step yet.")
        return
    _headline(snap)
    _views(snap)


st.title("penwatch · penalties while you train")
_WHERE = f"Prometheus {CONFIG.prometheus}" if CONFIG.prometheus else f"SQLite store {CONFIG.db}"
st.caption(f"Source: {md_escape(_WHERE)} · refreshing every {CONFIG.refresh_seconds:g} s")
live()
