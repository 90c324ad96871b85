"""``LossSpike``: a robust z-score of the loss (or any metric) over a recent window."""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Sequence

from penwatch import _checks
from penwatch.alerts._base import Alert, Episodes
from penwatch.schema import Event, StepRecord
from penwatch.schema import thresholds as th

__all__ = ["LossSpike", "robust_zscore"]

_MAD_SCALE = 1.4826  # 1 / Phi^-1(3/4): MAD -> standard deviation under normality
_MEANAD_SCALE = 1.2533  # sqrt(pi / 2): mean absolute deviation -> standard deviation


def robust_zscore(value: float, history: Sequence[float]) -> float | None:
    """Modified z-score of ``value`` against ``history``.

    .. math::
       z = \\frac{x - \\operatorname{median}(h)}{1.4826 \\cdot \\operatorname{MAD}(h)}

    falling back to ``1.2533 * mean|h - median|`` when the MAD is 0.

    Returns:
      The z-score, or None when the history has no spread at all.

    References:
      Iglewicz and Hoaglin, "How to Detect and Handle Outliers", 1993.
    """
    return _score(value, history)[0]


def _median_of_sorted(s: Sequence[float]) -> float:
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def _score(value: float, history: Sequence[float]) -> tuple[float | None, float]:
    # The definition, two sorts (LossSpike scores through _Window, which gives the same
    # numbers in O(log n) per record).
    ordered = sorted(history)
    if not ordered:
        return None, math.nan
    median = _median_of_sorted(ordered)
    dev = sorted([abs(v - median) for v in ordered])
    scale = _MAD_SCALE * _median_of_sorted(dev)
    if scale == 0.0:
        scale = _MEANAD_SCALE * math.fsum(dev) / len(dev)
    if scale == 0.0:
        return None, median
    return (value - median) / scale, median


class _Window:
    """The last ``size`` values, in arrival order and sorted: the robust z-score of a new
    value in O(log n) (median by index, MAD by a k-th smallest search) instead of two
    sorts of the window per record. Scores equal :func:`robust_zscore`'s exactly."""

    __slots__ = ("order", "sorted")

    def __init__(self, size: int) -> None:
        self.order: collections.deque[float] = collections.deque(maxlen=size)
        self.sorted: list[float] = []

    def __len__(self) -> int:
        return len(self.order)

    def append(self, value: float) -> None:
        if len(self.order) == self.order.maxlen:
            del self.sorted[bisect.bisect_left(self.sorted, self.order[0])]
        self.order.append(value)
        bisect.insort(self.sorted, value)

    def median(self) -> float:
        return _median_of_sorted(self.sorted) if self.sorted else math.nan

    def score(self, value: float) -> tuple[float | None, float]:
        """``(z, median)`` as :func:`_score` gives them for this window."""
        s, n = self.sorted, len(self.sorted)
        if not n:
            return None, math.nan
        median = _median_of_sorted(s)
        mid = n // 2 + 1
        mad = _kth_deviation(s, median, mid)
        if n % 2 == 0:
            mad = 0.5 * (_kth_deviation(s, median, mid - 1) + mad)
        scale = _MAD_SCALE * mad
        if scale == 0.0:
            scale = _MEANAD_SCALE * math.fsum([abs(v - median) for v in s]) / n
        if scale == 0.0:
            return None, median
        return (value - median) / scale, median


def _kth_deviation(s: list[float], median: float, k: int) -> float:
    """The ``k``-th smallest (1-based) of ``|v - median|`` over the sorted ``s``, in
    O(log n). The deviations are two ascending runs, ``median - s[p - 1 - i]`` below the
    median and ``s[p + j] - median`` from it up; binary search on how many of the ``k``
    come from the first."""
    p = bisect.bisect_left(s, median)
    na, nb = p, len(s) - p
    lo, hi = max(0, k - nb), min(k, na)
    while True:
        i = (lo + hi) // 2
        j = k - i
        if i < na and j > 0 and s[p + j - 1] - median > median - s[p - 1 - i]:
            lo = i + 1  # too few from below
        elif i > 0 and j < nb and median - s[p - i] > s[p + j] - median:
            hi = i - 1  # too many from below
        else:
            low = median - s[p - i] if i > 0 else -math.inf
            return max(low, s[p + j - 1] - median if j > 0 else -math.inf)


class LossSpike(Alert):
    """Fires when a metric jumps above its recent level: robust z-score > ``zscore``.

    Keeps the last ``window`` finite values (per pipeline label) and scores each new one
    against them with :func:`robust_zscore` (median/MAD, so earlier spikes barely move the
    baseline). Upward spikes only; non-finite values are left to :class:`NonFinite`.
    A value also has to rise at least ``min_delta`` above the median (an absolute
    floor): on a converged loss the spread is tiny, so a move from 0.005 to 0.02 scores
    a huge z but is no spike. Fires once per episode, re-arming when the score falls
    back under the threshold.

    Args:
      zscore: threshold on the robust z-score.
      window: how many recent values form the baseline.
      metric: ``"loss"`` (the record's task loss) or any metric key, e.g. ``"total"``.
      min_delta: the absolute floor on ``value - median`` (finite, >= 0; 0 disables
        it). Default :data:`penwatch.schema.thresholds.SPIKE_MIN_DELTA`.
      min_history: values needed before scoring (default ``max(8, window // 4)``,
        at most ``window``).
    """

    name = "LossSpike"

    def __init__(
        self,
        zscore: float = th.SPIKE_ZSCORE,
        window: int = th.SPIKE_WINDOW,
        metric: str = "loss",
        *,
        min_delta: float = th.SPIKE_MIN_DELTA,
        min_history: int | None = None,
    ) -> None:
        fn = "penwatch.alerts.LossSpike"
        self.zscore = _checks.check_positive(fn, "zscore", zscore)
        self.window = _checks.check_int(fn, "window", window, min=3)
        if not isinstance(metric, str) or not metric:
            raise _checks.option_error(fn, "metric", metric, "a metric key such as 'loss'")
        self.metric = metric
        self.min_delta = _checks.check_finite_real(fn, "min_delta", min_delta, min=0.0)
        if min_history is None:
            min_history = min(self.window, max(8, self.window // 4))
        self.min_history = _checks.check_int(fn, "min_history", min_history, min=3, max=self.window)
        self._history: dict[str, _Window] = {}
        self._episodes = Episodes(patience=1)

    def evaluate(self, record: StepRecord) -> Sequence[Event]:
        value = record.loss if self.metric == "loss" else record.values.get(self.metric)
        if value is None and self.metric == "loss":
            value = record.values.get("loss")
        if value is None or not math.isfinite(value):
            return ()
        history = self._history.get(record.pipeline)
        if history is None:
            history = self._history[record.pipeline] = _Window(self.window)
        events = []
        if len(history) >= self.min_history:
            # A value at or below the median, or less than min_delta above it, is no
            # spike whatever the spread (z <= 0 < zscore, or under the floor): the MAD
            # is searched for only above both (most steps of a falling loss are not).
            median, z = history.median(), None
            if value - median > 0.0 and value - median >= self.min_delta:
                z = history.score(value)[0]
            spike = z is not None and z > self.zscore
            if self._episodes.update(record.pipeline, spike):
                events.append(
                    self._event(
                        record,
                        f"{self.metric} spiked to {value:.4g} at step {record.step}: robust "
                        f"z-score {z:.1f} > {self.zscore:g} (median {median:.4g} over the "
                        f"last {len(history)} values)",
                        attributes={
                            "metric": self.metric,
                            "value": value,
                            "median": median,
                            "zscore": z,
                            "threshold": self.zscore,
                            "min_delta": self.min_delta,
                        },
                    )
                )
        history.append(value)
        return events

    def __repr__(self) -> str:
        return (
            f"LossSpike(zscore={self.zscore}, window={self.window}, metric={self.metric!r}, "
            f"min_delta={self.min_delta})"
        )
