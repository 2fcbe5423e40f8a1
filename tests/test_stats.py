"""realm_core/stats.py: the paired bootstrap interval behind every "A beats B" in reports/quality."""

from __future__ import annotations

import numpy as np
import pytest

from realm_core.stats import paired_bootstrap


def _pair(n: int, p_a: float, flip: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """b agrees with a on most questions and differs on a share `flip` of them."""
    rng = np.random.default_rng(seed)
    a = (rng.random(n) < p_a).astype(float)
    b = np.where(rng.random(n) < flip, 1 - a, a)
    return a, b


def test_identical_systems_differ_by_exactly_zero():
    a, _ = _pair(300, 0.3, 0.0, 0)
    d = paired_bootstrap(a, a)
    assert d.diff == d.ci_low == d.ci_high == 0.0 and not d.separates


def test_the_difference_is_in_points_and_its_interval_contains_it():
    a, b = _pair(500, 0.4, 0.3, 1)
    d = paired_bootstrap(a, b)
    assert d.diff == pytest.approx(100 * (a.mean() - b.mean()))
    assert (
        d.a_score == pytest.approx(100 * a.mean()) and d.b_score == pytest.approx(100 * b.mean()) and d.questions == 500
    )
    assert d.ci_low < d.diff < d.ci_high


def test_a_clearly_better_system_separates_and_a_coin_flip_does_not():
    rng = np.random.default_rng(2)
    b = (rng.random(600) < 0.2).astype(float)
    a = np.maximum(b, (rng.random(600) < 0.15).astype(float))  # a gets b's hits and more
    assert paired_bootstrap(a, b).ci_low > 0
    noise = [paired_bootstrap(*_pair(200, 0.5, 0.1, seed)) for seed in range(20)]  # a and b differ at random
    assert sum(d.separates for d in noise) <= 4  # about 5% expected at 95% confidence


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """Coverage over repeated draws: the true difference of means is 0.3 - 0.2 = 10 points."""
    covered = 0
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        a, b = (rng.random(400) < 0.3).astype(float), (rng.random(400) < 0.2).astype(float)
        d = paired_bootstrap(a, b, resamples=2000, seed=seed)
        covered += d.ci_low <= 10.0 <= d.ci_high
    assert covered >= 51  # 95% of 60 is 57; allow the sampling spread of coverage itself


def test_pairing_makes_the_interval_tighter_than_for_unpaired_scores():
    a, b = _pair(400, 0.4, 0.05, 3)  # highly correlated systems
    paired = paired_bootstrap(a, b)
    unpaired = paired_bootstrap(a, np.random.default_rng(0).permutation(b))  # the same scores, pairing destroyed
    assert paired.ci_high - paired.ci_low < 0.6 * (unpaired.ci_high - unpaired.ci_low)


def test_score_vectors_of_different_questions_are_refused():
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_bootstrap([1], [0])
