"""Paired comparisons of two systems on the same questions, with bootstrap confidence intervals.

REALM's Table 2 compares systems on the same test questions; with a few hundred questions, one
question moves a score by several tenths of a point, so a difference means something only with
its interval. Both systems are scored per question (1/0 for a hit or an exact match); resampling
*questions* (the pairs together) keeps the correlation between the two systems, which makes the
interval of the difference much tighter than two separate intervals would suggest (Koehn 2004,
"Statistical significance tests for machine translation evaluation"; Dror et al. 2018).

The resampling is scipy.stats.bootstrap with `paired=True` (BCa intervals, which correct the
percentile interval's bias and skew); the statistic is the difference of the means, in points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedDifference:
    """mean(a) - mean(b) over the same questions, in points (x100), with its bootstrap interval."""

    a_score: float  # mean score of system a, points
    b_score: float
    diff: float  # a - b
    ci_low: float
    ci_high: float
    questions: int
    confidence: float = CONFIDENCE

    @property
    def separates(self) -> bool:
        """The interval excludes 0: the data say which system is better."""
        return self.ci_low > 0 or self.ci_high < 0

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> PairedDifference:
    """The difference of mean per-question scores a - b (x100), with a paired bootstrap interval.

    `a[i]` and `b[i]` must score the same question i. When every question gives the same
    difference (e.g. two identical systems) the interval is that difference, with no resampling.
    """
    from scipy.stats import bootstrap

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"paired_bootstrap needs two score vectors over the same questions, got shapes {x.shape} and {y.shape}"
        )
    if len(x) < 2:
        raise ValueError(f"paired_bootstrap needs at least 2 questions, got {len(x)}")
    diff = 100.0 * float(x.mean() - y.mean())
    d = x - y
    if np.all(d == d[0]):  # a degenerate distribution: BCa is undefined, and the interval is a point
        low = high = diff
    else:

        def interval(method: str) -> tuple[float, float]:
            res = bootstrap(
                (x, y),
                lambda u, v, axis=-1: 100.0 * (u.mean(axis=axis) - v.mean(axis=axis)),
                paired=True,
                vectorized=True,
                confidence_level=confidence,
                n_resamples=resamples,
                method=method,
                rng=np.random.default_rng(seed),
            )
            return float(res.confidence_interval.low), float(res.confidence_interval.high)

        low, high = interval("BCa")
        if not (
            np.isfinite(low) and np.isfinite(high)
        ):  # BCa fails on near-degenerate data (a handful of differing questions)
            low, high = interval("percentile")
    return PairedDifference(100.0 * float(x.mean()), 100.0 * float(y.mean()), diff, low, high, len(x), confidence)
