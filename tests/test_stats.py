"""stats.py: t intervals over seeds, the paired bootstrap over images (and seeds), verdicts."""

import math

import numpy as np
import pytest

import stats


def test_mean_interval_matches_the_t_interval():
    # [1, 2, 3, 4, 5]: mean 3, sd sqrt(2.5), sem sqrt(0.5); t(0.975, df=4) = 2.776445105 (tables)
    mean, low, high = stats.mean_interval([1, 2, 3, 4, 5])
    half = 2.776445105 * math.sqrt(0.5)
    assert mean == pytest.approx(3)
    assert (low, high) == pytest.approx((3 - half, 3 + half), abs=1e-6)
    # [0.71, 0.74, 0.69]: mean 0.7133.., sd 0.025166, t(0.95, df=2) = 2.919985580 (90% interval)
    mean, low, high = stats.mean_interval([0.71, 0.74, 0.69], confidence=0.90)
    sd = math.sqrt(((0.71 - 0.2140 / 0.3) ** 2 + (0.74 - 0.2140 / 0.3) ** 2 + (0.69 - 0.2140 / 0.3) ** 2) / 2)
    half = 2.919985580 * sd / math.sqrt(3)
    assert mean == pytest.approx(2.14 / 3)
    assert (low, high) == pytest.approx((2.14 / 3 - half, 2.14 / 3 + half), abs=1e-6)


def test_mean_interval_edge_cases():
    assert stats.mean_interval([0.7]) == (0.7, None, None)  # one seed: no spread, no interval
    assert stats.mean_interval([0.7, None, float("nan")]) == (0.7, None, None)
    assert stats.mean_interval([]) == (None, None, None)
    assert stats.mean_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    mean, low, high = stats.mean_interval([1, None, 2, 3, 4, 5])  # None ignored
    assert mean == pytest.approx(3) and low == pytest.approx(3 - 2.776445105 * math.sqrt(0.5), abs=1e-6)


def flipped(a, fraction, rng, to=0):
    """a copy of the 0/1 scores a with `fraction` of all images (among those scoring 1 - to) set to `to`."""
    b = a.copy()
    k = int(round(fraction * len(a)))
    b[rng.choice(np.flatnonzero(a != to), size=k, replace=False)] = to
    return b


def test_known_difference_is_covered_and_zero_is_excluded():
    rng = np.random.default_rng(0)
    n = 2000
    a = (rng.random(n) < 0.7).astype(float)
    b = flipped(a, 0.05, rng)  # 100 of a's right answers made wrong: a - b is exactly 0.05
    diff, low, high = stats.paired_difference(a, b)
    assert diff == pytest.approx(0.05)
    assert 0 < low < 0.05 < high
    # paired: the spread is that of the 5% of images that differ (sd of a - b = sqrt(.05 * .95)),
    # about 1.96 * 0.0049 each side; an unpaired bootstrap would be about 0.028 each side
    se = math.sqrt(0.05 * 0.95 / n)
    assert (low, high) == pytest.approx((0.05 - 1.96 * se, 0.05 + 1.96 * se), abs=0.0025)
    # and the other way round
    diff, low, high = stats.paired_difference(b, a)
    assert diff == pytest.approx(-0.05) and low < -0.05 < high < 0
    assert stats.verdict(*stats.paired_difference(a, b), "explained", "self_attention").startswith(
        "explained ahead by 0.050 (95% CI [0.0"
    )


def test_no_difference():
    rng = np.random.default_rng(1)
    a = (rng.random(1000) < 0.6).astype(float)
    # the same score on other images: 60 right answers lost, 60 others gained
    b = flipped(flipped(a, 0.06, rng, to=0), 0.06, rng, to=1)
    assert (a != b).sum() >= 60 and a.mean() == b.mean()
    diff, low, high = stats.paired_difference(a, b)
    assert diff == 0 and low < 0 < high
    assert stats.verdict(diff, low, high, "A", "B").startswith("no difference detected (95% CI [-0.0")
    assert stats.paired_difference(a, a.copy()) == (0.0, 0.0, 0.0)
    assert "covers 0" in stats.verdict(*stats.paired_difference(a, a.copy()), "A", "B")


def test_the_bootstrap_is_reproducible_and_its_level_is_used():
    rng = np.random.default_rng(2)
    a = (rng.random(500) < 0.6).astype(float)
    b = (rng.random(500) < 0.5).astype(float)
    assert stats.paired_difference(a, b, seed=3) == stats.paired_difference(a, b, seed=3)
    _, low95, high95 = stats.paired_difference(a, b)
    _, low80, high80 = stats.paired_difference(a, b, confidence=0.8)
    assert low95 < low80 < high80 < high95


def test_missing_entries_are_dropped_pairwise():
    a = [1, 1, None, 1, 0, 1, float("nan"), 1]
    b = [0, 1, 1, None, 0, 0, 0, 1]
    # images 2, 3 and 6 lack one score; treating a missing score as 0 would give another mean
    diff, low, high = stats.paired_difference(a, b, n_resamples=500)
    assert diff == pytest.approx(np.mean([1 - 0, 1 - 1, 0 - 0, 1 - 0, 1 - 1]))
    assert low <= diff <= high
    assert stats.paired_difference([None, 1], [1, None]) == (None, None, None)
    assert stats.verdict(None, None, None, "A", "B").startswith("no comparison")
    with pytest.raises(ValueError):
        stats.paired_difference([1, 0, 1], [1, 0])


def test_seeds_axis():
    rng = np.random.default_rng(4)
    n = 1000
    base = (rng.random(n) < 0.7).astype(float)
    # every seed of a is 0.05 ahead of b's seeds on the same images: the seeds agree
    a = np.stack([base] * 3)
    b = np.stack([flipped(base, 0.05, rng) for _ in range(4)])  # the seed counts may differ
    diff, low, high = stats.paired_difference(a, b)
    assert diff == pytest.approx(0.05)
    assert 0 < low < 0.05 < high

    # now a's seeds disagree widely (0.5 to 0.9) around b's 0.7: the seeds, not the 1000 images,
    # limit what is known, so the interval is wide; treating 4 x 1000 scores as 4000 images would
    # give about +-0.02
    a = np.stack(
        [flipped(base, 0.2, rng), flipped(base, 0.2, rng), flipped(base, 0.2, rng, to=1), flipped(base, 0.2, rng, to=1)]
    )
    b = np.stack([base] * 2)
    diff, low, high = stats.paired_difference(a, b)
    assert diff == pytest.approx(0.0)
    assert low < -0.08 and high > 0.08
    assert "covers 0" in stats.verdict(diff, low, high, "A", "B")

    # a 1-D b is one seed; a seed's missing entries only drop that seed's value for the image
    a = np.array([[1, 0, 1, 1], [1, None, 0, 1]], dtype=object)
    diff, _, _ = stats.paired_difference(a, [0, 0, 1, 0], n_resamples=200)
    assert diff == pytest.approx(np.mean([1, 0, 0.5 - 1, 1]))


def test_verdict_words():
    assert stats.verdict(0.05, 0.02, 0.08, "A", "B") == "A ahead by 0.050 (95% CI [0.020, 0.080])"
    assert stats.verdict(-0.05, -0.08, -0.02, "A", "B") == "B ahead by 0.050 (95% CI [0.020, 0.080])"
    assert stats.verdict(0.01, -0.01, 0.03, "A", "B") == "no difference detected (95% CI [-0.010, 0.030] covers 0)"
    assert stats.verdict(0.02, 0.0, 0.04, "A", "B").startswith("no difference detected")
    assert stats.verdict(0.05, 0.02, 0.08, "A", "B", confidence=0.9).endswith("(90% CI [0.020, 0.080])")
