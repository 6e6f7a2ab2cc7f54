"""Paired comparisons across seeds: the mean difference and its 95% interval.

Two cells of one seed share their random numbers (initial model, partitions,
Byzantine ids, minibatches), so the evaluation compares them seed by seed: for
seeds ``s = 1 .. k`` with differences ``d_s = a_s - b_s``, it reports the mean
``d = (1/k) sum_s d_s`` and the Student t interval

    d +- t_{0.975, k-1} * s_d / sqrt(k),   s_d^2 = (1/(k-1)) sum_s (d_s - d)^2

(the sample variance, divisor ``k - 1``). A difference is *significant* when its
interval excludes 0. With one seed there is no interval.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping

__all__ = ["Interval", "mean_interval", "paired_difference"]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval (``None`` bounds with fewer than two seeds)."""

    mean: float
    low: float | None
    high: float | None
    count: int

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return (
            self.low is not None
            and self.high is not None
            and (self.low > 0 or self.high < 0)
        )

    @property
    def half_width(self) -> float | None:
        """Half the interval's width."""
        if self.low is None or self.high is None:
            return None
        return (self.high - self.low) / 2


def mean_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """Return the mean of `values` and its Student t interval.

    Examples
    --------
    >>> i = mean_interval([1.0, 2.0, 3.0])
    >>> round(i.mean, 3), round(i.low, 3), round(i.high, 3)
    (2.0, -0.484, 4.484)
    """
    if not values:
        raise ValueError("Expected at least one value, got none")
    k = len(values)
    mean = statistics.fmean(values)
    if k < 2:
        return Interval(mean, None, None, k)
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, k - 1)) * statistics.stdev(values)
    half /= math.sqrt(k)
    return Interval(mean, mean - half, mean + half, k)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Interval:
    """Return the mean of ``a[s] - b[s]`` over the seeds both have, and its interval."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("Expected the two sides to share a seed, got none in common")
    return mean_interval([a[s] - b[s] for s in seeds])
