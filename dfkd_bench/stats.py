"""Statistics over seeds: mean, std, a t-distribution confidence interval, and Welch's t-test.

Every function refuses to invent spread: with fewer than two values the std, the interval and
the test are NaN, and the tables print them as "n/a".
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05  # two-sided p below this: significantly worse than the best
NA = "n/a"


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values, their sample std (ddof=1) and the t-interval of the mean; NaN when n < 2."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def estimate(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean ± std of ``values`` and the ``confidence`` interval of the mean, mean ± t(n-1) * std / sqrt(n)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Estimate(n, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return Estimate(n, mean, std, mean - half, mean + half)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) of ``a`` against ``b``; NaN if either n < 2."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's precision note on nearly equal samples
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    # two identical constant samples give t = 0/0: no difference at all (different constants give p = 0)
    return 1.0 if math.isnan(p) else p


def paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of ``a`` against ``b`` (same length, pairs in order; e.g. two
    methods' means on the same teachers); NaN with fewer than two pairs; 1.0 when every difference is 0."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    if len(a) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_rel(a, b).pvalue)
    return 1.0 if math.isnan(p) else p


@dataclass(frozen=True)
class Mark:
    """Whether a method belongs to the best group: ``best``, ``yes``, ``no`` or ``n/a``, and its p vs the best."""

    mark: str
    p: float


def best_group(samples: Mapping[Hashable, Sequence[float]], alpha: float = ALPHA) -> dict[Hashable, Mark]:
    """Mark each contender against the one with the highest mean (ties: the first key in order).

    ``yes``: Welch's two-sided p >= ``alpha`` (not significantly worse); ``no``: p < ``alpha``;
    ``n/a``: the contender or the best has fewer than two values, so nothing can be tested.
    """
    scored = {k: list(v) for k, v in samples.items() if len(v)}
    if not scored:
        return {}
    best = max(scored, key=lambda k: float(np.mean(scored[k])))
    out = {}
    for key, values in scored.items():
        if len(values) < 2 or len(scored[best]) < 2:
            out[key] = Mark(NA, math.nan)
        elif key == best:
            out[key] = Mark("best", math.nan)
        else:
            p = welch_p(values, scored[best])
            out[key] = Mark("yes" if p >= alpha else "no", p)
    return out


__all__ = ["ALPHA", "CONFIDENCE", "NA", "Estimate", "Mark", "best_group", "estimate", "welch_p"]
