"""penwatch live dashboard: ``streamlit run dashboard/app.py [-- --db PATH]``.

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
import sys

import streamlit as st
from penwatch.dashboard import _dominance as _dom
from penwatch.dashboard import charts, sources
from penwatch.dashboard._runs import age, status_note
from penwatch.dashboard._text import md_escape

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


# Steps shown either side of a step the page jumps to (the first non-finite step). A
# comment, not a docstring: Streamlit's "magic" would draw a bare string on the page.
FOCUS_STEPS = 200


def _attention(snap: sources.Snapshot) -> None:
    """What needs attention, in words, before any chart (NaN, dominance, tug of war, ...)."""
    if not snap.attention:
        st.success("Nothing needs attention: every value finite, no term dominating or fighting.")
        return
    for item in snap.attention:
        subject = f"**{md_escape(item.subject)}** " if item.subject else ""
        label = {
            "nonfinite": "Non-finite values",
            "dominance": "Dominance",
            "conflict": "Conflict",
            "tug_of_war": "Tug of war",
            "collapse": "Collapse",
            "stalled": "Stalled run",
        }.get(item.what, item.what)
        show = st.error if item.level == "error" else st.warning
        show(f"{label}: {subject}{md_escape(item.detail)}")
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


def _headline(snap: sources.Snapshot) -> None:
    h, nf = snap.headline, snap.nonfinite
    cols = st.columns(7)
    cols[0].metric("Step", "–" if h.step is None else f"{h.step:,}")
    cols[1].metric("Base loss", _fmt(h.loss))
    cols[2].metric("Total penalty", _fmt(h.total))
    cols[3].metric(
        "Penalty share of loss",
        "–" if h.penalty_share is None else f"{100 * h.penalty_share:.1f} %",
        help=(
            "total penalty / (|base loss| + Σ|weighted penalty|) at the latest step: the "
            "usual total / (loss + total) when every penalty is a cost, negative when "
            "bonus terms outweigh the costs"
        ),
    )
    steps = f"{nf.steps:,}" if nf.exact else f"{nf.steps:,}–{nf.steps_max:,}"
    cols[4].metric(
        "Non-finite steps",
        steps,
        help="steps with a NaN/Inf value (not the number of values); a range when the "
        "source only has downsampled buckets or scrape intervals",
    )
    cols[5].metric(
        "Non-finite episodes",
        f"{nf.episodes:,}" if nf.exact else f"≥ {nf.episodes:,}",
        help="runs of consecutive non-finite steps",
    )
    cols[6].metric("Open alerts", f"{h.open_alerts}", help=f"{h.alerts} fired in total")
    where = "all processes" if snap.process is None else f"process {snap.process}"
    sampling = (
        "every step drawn" if snap.width == 1 else (f"downsampled: min–max per {snap.width} steps")
    )
    live = "live" if h.live else "not live"
    st.caption(
        f"run **{md_escape(snap.run)}** · {where} · status **{md_escape(h.status)}** ({live}) · "
        f"last update {age(h.updated_at)} · {sampling}"
    )


def _first_nonfinite(snap: sources.Snapshot) -> tuple[float, float] | None:
    """The first non-finite step, with a button that narrows every chart to it."""
    first = snap.nonfinite.first_step
    if first is None:
        return None
    key = f"penwatch_focus:{snap.run}"
    focused = st.session_state.get(key, False)
    left, right = st.columns([3, 1])
    left.markdown(
        f"First non-finite step: **{first:,}** "
        + ("" if snap.nonfinite.exact else "(within the first marked step range)")
    )
    label = "Show the whole run" if focused else f"Jump to step {first:,}"
    if right.button(label, key=f"penwatch_jump:{snap.run}"):
        focused = st.session_state[key] = not focused
    if not focused:
        return None
    span = (max(0.0, first - FOCUS_STEPS), first + FOCUS_STEPS)
    st.caption(f"Charts show steps {span[0]:,.0f}–{span[1]:,.0f} around step {first:,}.")
    return span


def _within(df, span: tuple[float, float] | None):
    if span is None or df.empty:
        return df
    return df[(df["step"] >= span[0]) & (df["step"] <= span[1])]


def _chart(chart: object, empty: str) -> None:
    if chart is None:
        st.info(empty)
    else:
        st.altair_chart(chart, width="stretch")


def _what_if(snap: sources.Snapshot, step: _dom.DominanceStep) -> None:
    """Weight sliders (log scale, default the current weight) and the figures the step
    would have had under them, from its term Gram matrix (``pw.diagnostics.what_if``)."""
    st.markdown(f"**What if** the weights had been different at step {step.step:,}?")
    st.text(_dom.suggestion_note(step))  # plain text: names shown literally
    penalties = step.terms[1:]
    chosen = {}
    cols = st.columns(min(3, max(1, len(penalties))))
    for i, term in enumerate(penalties):
        now = step.weights[term]
        with cols[i % len(cols)]:
            chosen[term] = st.select_slider(
                f"{md_escape(term)} weight (log scale; now {now:.3g})",  # labels are Markdown
                options=_dom.slider_options(now, step.suggested_weight.get(term)),
                value=now,
                format_func=_dom.weight_label,
                key=f"penwatch_whatif:{snap.run}:{step.step}:{term}",
            )
    table = _dom.what_if_table(step, chosen)
    st.dataframe(table, hide_index=True, width="stretch")


def _dominance_step(source: sources.Source, snap: sources.Snapshot) -> None:
    """One diagnostics step in words, then what-if sliders, the term × layer heat map
    and gradient vs update shares (``penwatch.dashboard._dominance``, SPEC §12)."""
    try:
        steps = source.diagnostics_steps(snap.run, snap.process)
        chosen = None
        if len(steps) > 1:
            key = f"penwatch_diag_step:{snap.run}:{snap.process}"
            latest_key = f"penwatch_diag_latest:{snap.run}:{snap.process}"
            picked = st.session_state.get(key)
            if picked not in steps or picked == st.session_state.get(latest_key):
                # the latest (following a live run), or a step gone from the list
                st.session_state[key] = steps[-1]
            st.session_state[latest_key] = steps[-1]
            chosen = st.select_slider(
                "Diagnostics step (default: the latest)",
                options=steps,
                key=key,
                format_func=lambda s: f"{s:,}",
            )
        found = source.step_values(snap.run, snap.process, chosen)
    except Exception as exc:  # a store mid-write, a network error: say so, retry next tick
        logger.warning("dashboard: reading a diagnostics step failed: %s", exc)
        st.warning(md_escape(f"Could not read a diagnostics step this time ({exc}); retrying."))
        return
    if found is None:
        st.info("No diagnostics step with per-term gradients recorded yet.")
        return
    at, where, values = found
    step = _dom.step_from_values(at, values)
    if step is None:
        st.info("No diagnostics step with per-term gradients recorded yet.")
        return
    for sentence in _dom.sentences(step):
        st.info(md_escape(sentence))
    st.text(  # plain text: pipeline names shown literally
        f"Step {step.step:,} ({where}); {len(steps)} diagnostics steps to pick."
        if steps
        else f"Step {step.step:,} ({where})."
    )
    if step.gram is not None:
        _what_if(snap, step)
    elif not steps:
        st.info(
            "This source keeps no term Gram matrix, so the what-if sliders need the SQLite "
            "store (`--db`); shown: the latest shares, cosines and suggested weights."
        )
    else:
        st.info("This diagnostics step recorded no term Gram matrix: no what-if.")
    left, right = st.columns([3, 2])
    with left:
        _chart(_dom.heatmap(step), "No per-layer gradient norms at this step.")
    with right:
        st.markdown("**Gradient vs update shares**")
        table = _dom.share_table(step)
        if step.suggested_weight:
            table["weight"] = [step.weights.get(t) for t in table["term"]]
            table["suggested weight"] = [step.suggested_weight.get(t) for t in table["term"]]
        st.dataframe(table, hide_index=True, width="stretch")
        if not step.update_share:
            st.text("No update shares: the optimizer is not diagonally preconditioned.")


def _dominance(
    source: sources.Source, snap: sources.Snapshot, span: tuple[float, float] | None
) -> None:
    """The dominance section (SPEC §4 and §12): a diagnostics step in words, what-if
    sliders, the term × layer heat map and gradient vs update shares; then the
    gradients per term over the run."""
    st.subheader("Dominance: gradients per term" if snap.grad_wrt == "params" else "Gradient norms")
    if snap.grad_wrt is None:
        st.info(
            "No gradient diagnostics recorded (run them with the trainer's diagnostics, "
            "or `track_grad_norms=True`)."
        )
        return
    if snap.grad_wrt == "params":
        _dominance_step(source, snap)
    highlight = {r.term: r.status for r in snap.terms.itertuples() if r.status != "ok"}
    grads = _within(snap.grads, span)
    cols = st.columns(3 if snap.grad_wrt == "params" else 1)
    quantities = ("grad_norm", "grad_share", "grad_cosine")[: len(cols)]
    for col, q in zip(cols, quantities, strict=True):
        with col:
            _chart(charts.grads(grads, q, snap.width, highlight), f"No {q} yet.")
    if snap.grad_wrt == "params":
        left, right = st.columns([1, 2])
        with left:
            _chart(charts.terms(snap.terms), "No gradient shares yet.")
        with right:
            st.dataframe(snap.terms, hide_index=True, width="stretch")


def _views(source: sources.Source, snap: sources.Snapshot) -> None:
    span = _first_nonfinite(snap)
    left, right = st.columns([2, 1])
    with left:
        _chart(
            charts.contributions(_within(snap.contributions, span), snap.width),
            "No penalties recorded yet.",
        )
    with right:
        _chart(charts.shares(snap.shares), "No penalty shares yet.")
    left, right = st.columns([2, 1])
    with left:
        _chart(
            charts.losses(
                _within(snap.losses, span), _within(snap.nonfinite_steps, span), snap.width
            ),
            "No loss recorded yet.",
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
    _dominance(source, snap, span)
    st.subheader("Non-finite events and alerts")
    if snap.events.empty:
        st.success("No non-finite episodes and no alerts so far.")
    else:
        extent = None
        if len(snap.losses):
            extent = (float(snap.losses["step"].min()), float(snap.losses["step"].max()))
        _chart(charts.timeline(snap.events, extent), "")
        recent = snap.events.sort_values("step", ascending=False).head(50)
        shown = [c for c in recent.columns if c != "wall_time"]
        shown = [c for c in shown if c not in ("capsule", "replay") or recent[c].notna().any()]
        st.dataframe(recent[shown], hide_index=True, width="stretch")
        forensics = snap.events[snap.events["capsule"].notna() | snap.events["replay"].notna()]
        for e in forensics.head(3).itertuples():
            st.text(
                f"step {int(e.step)}: capsule {e.capsule or '–'}"
                + (f"\nreplay: {e.replay}" if isinstance(e.replay, str) else "")
            )


def _run_label(run: sources.RunChoice) -> str:
    """A picker option: plain text (selectbox options are not Markdown)."""
    step = "no steps yet" if run.last_step is None else f"step {run.last_step:,}"
    return f"{run.name} · {run.status} · {step}"


def _pick(runs: list[sources.RunChoice]) -> tuple[sources.RunChoice, int | None, list[str]]:
    names = [r.name for r in runs]
    if st.session_state.get("penwatch_run") not in names:
        st.session_state["penwatch_run"] = names[0]
    by_name = {r.name: r for r in runs}
    left, middle, right = st.columns([2, 2, 1])
    with left:
        name = st.selectbox(
            "Run", names, key="penwatch_run", format_func=lambda n: _run_label(by_name[n])
        )
    others = [n for n in names if n != name]
    kept = [n for n in st.session_state.get("penwatch_compare", []) if n in others]
    st.session_state["penwatch_compare"] = kept
    with middle:
        compare = st.multiselect(
            "Compare with",
            others,
            key="penwatch_compare",
            format_func=lambda n: _run_label(by_name[n]),
            placeholder="other runs (overlay loss, penalties, shares, durations)",
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
    return choice, process, compare


def _status(choice: sources.RunChoice, process: int | None) -> None:
    """Say plainly when the selected run is not live (or a process of it has ended)."""
    note = status_note(choice, process, stale_after=CONFIG.stale_after)
    if note is not None:
        level, text = note
        {"info": st.info, "warning": st.warning, "error": st.error}[level](text)


def _comparison(snaps: list[sources.Snapshot]) -> None:
    """Two or more runs overlaid: loss, penalties, shares and device-time durations."""
    import pandas as pd

    st.subheader("Comparison of " + ", ".join(f"**{md_escape(s.run)}**" for s in snaps))

    def stack(get) -> pd.DataFrame:
        parts = [get(s).assign(run=s.run) for s in snaps]
        parts = [p for p in parts if len(p)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    losses = stack(lambda s: s.losses)
    penalties = stack(lambda s: s.contributions.rename(columns={"penalty": "series"}))
    shares = stack(lambda s: s.shares.rename(columns={"penalty": "name", "share": "value"}))
    durations = stack(lambda s: s.durations.rename(columns={"percentile": "series", "ms": "value"}))
    left, right = st.columns(2)
    with left:
        _chart(
            charts.compare(losses, "Compared: base loss and total penalty", "loss (loss units)")
            if len(losses)
            else None,
            "No loss recorded in these runs.",
        )
    with right:
        _chart(
            charts.compare(
                penalties, "Compared: weighted penalties", "weight × penalty (loss units)"
            )
            if len(penalties)
            else None,
            "No penalties recorded in these runs.",
        )
    left, right = st.columns(2)
    with left:
        _chart(
            charts.compare_bars(shares, "Compared: share of total penalty", "w_i / Σ|w_j|")
            if len(shares)
            else None,
            "No penalty shares in these runs.",
        )
    with right:
        _chart(
            charts.compare(
                durations, "Compared: device time per step", "duration (ms, log scale)", log=True
            )
            if len(durations)
            else None,
            "No step durations in these runs.",
        )
    rows = [
        {
            "run": s.run,
            "status": s.headline.status,
            "step": s.headline.step,
            "base loss": s.headline.loss,
            "total penalty": s.headline.total,
            "non-finite steps": s.nonfinite.steps,
            "p50 device ms": s.duration_summary.get("p50"),
        }
        for s in snaps
    ]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def _selected(runs: list[sources.RunChoice]) -> list[str]:
    """The runs the picker has selected (the run, then those compared), from its state."""
    names = [r.name for r in runs]
    run = st.session_state.get("penwatch_run")
    run = run if run in names else names[0]
    others = [n for n in st.session_state.get("penwatch_compare", []) if n in names and n != run]
    return [run, *others]


def _page(source: sources.Source, live: bool) -> None:
    """The picker and the page body; refreshes itself while a selected run is ``live``."""
    try:
        runs = source.runs()
    except Exception as exc:  # a store mid-write, a network error: say so, retry next tick
        logger.warning("dashboard: reading %s failed: %s", source.label, exc)
        st.warning(
            md_escape(f"Could not read {source.label} this time ({type(exc).__name__}: {exc})")
            + "; retrying."
        )
        return
    by_name = {r.name: r for r in runs}
    if not runs or any(by_name[n].live for n in _selected(runs)) != live:
        # a run ended (stop refreshing) or resumed (refresh again): before any element
        st.rerun(scope="app")
    choice, process, compare = _pick(runs)
    if any(by_name[n].live for n in (choice.name, *compare)) != live:
        st.rerun(scope="app")  # the user picked a run that is (or is not) live
    if not live:
        st.caption(
            "Not refreshing: the runs shown have ended. "
            "Reload the page or change the selection to look again."
        )
    run = choice.name
    _status(choice, process)
    try:
        snap = source.snapshot(run, process)
        others = [source.snapshot(n, None) for n in compare]
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
    st.subheader("Needs attention")
    _attention(snap)
    _headline(snap)
    if others:
        _comparison([snap, *others])
    _views(source, snap)


def _wait_for_runs(source: sources.Source) -> None:
    """No store or no run yet: say so, and look again every refresh."""
    try:
        runs = source.runs()
    except sources.SourceUnavailable as exc:
        st.info(md_escape(exc))
        return
    except Exception as exc:
        logger.warning("dashboard: reading %s failed: %s", source.label, exc)
        st.warning(
            md_escape(f"Could not read {source.label} this time ({type(exc).__name__}: {exc})")
            + "; retrying."
        )
        return
    if runs:
        st.rerun(scope="app")
    st.info(
        f"{md_escape(source.label)} has no runs yet. Start one (`penwatch demo`); this page "
        "refreshes by itself."
    )


def main() -> None:
    """Draw the selected runs: refreshing while one of them is live, once when all ended."""
    source = sources.session_source(st.session_state, CONFIG)
    try:
        runs = source.runs()
    except Exception:
        runs = []
    if not runs:
        st.fragment(_wait_for_runs, run_every=CONFIG.refresh_seconds)(source)
        return
    by_name = {r.name: r for r in runs}
    if any(by_name[n].live for n in _selected(runs)):
        st.fragment(_page, run_every=CONFIG.refresh_seconds)(source, True)
    else:
        # Not a fragment at all: the browser's timer for the live page's fragment then
        # names a fragment this run did not register, and Streamlit skips its reruns (a
        # fragment without run_every would keep the same id, and the old timer).
        _page(source, False)


st.title("penwatch · penalties while you train")
_WHERE = f"Prometheus {CONFIG.prometheus}" if CONFIG.prometheus else f"SQLite store {CONFIG.db}"
st.caption(f"Source: {md_escape(_WHERE)} · refreshing every {CONFIG.refresh_seconds:g} s")
main()
