"""stats.py: t intervals over seeds, the seeds-and-images interval of a difference and the level it
holds (simulated), the detectable size, verdicts."""

import math

import numpy as np
import pytest
import scipy.stats
from scipy.special import expit

import stats


def test_mean_interval_matches_the_t_interval():
    # [1, 2, 3, 4, 5]: mean 3, sd sqrt(2.5), sem sqrt(0.5); t(0.975, df=4) = 2.776445105 (tables)
    mean, low, high = stats.mean_interval([1, 2, 3, 4, 5])
    half = 2.776445105 * math.sqrt(0.5)
    assert mean == pytest.approx(3)
    assert (low, high) == pytest.approx((3 - half, 3 + half), abs=1e-6)
    mean, low, high = stats.mean_interval([0.71, 0.74, 0.69], confidence=0.90)
    half = 2.919985580 * np.std([0.71, 0.74, 0.69], ddof=1) / math.sqrt(3)  # t(0.95, df=2)
    assert (low, high) == pytest.approx((2.14 / 3 - half, 2.14 / 3 + half), abs=1e-6)


def test_mean_interval_edge_cases():
    assert stats.mean_interval([0.7]) == (0.7, None, None)  # one seed: no spread, no interval
    assert stats.mean_interval([0.7, None, float("nan")]) == (0.7, None, None)
    assert stats.mean_interval([]) == (None, None, None)
    assert stats.mean_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


def test_without_an_image_component_the_interval_is_welchs_over_the_seed_means():
    """Scores x_k + s_i (seed i of a) and x_k + t_j (seed j of b): every image shows the same
    difference and nothing is left after the seed and image effects, so the image component is
    zero and the interval is Welch's t over the per-seed means: with Welch-Satterthwaite's df
    for equal seed counts, Hsu's min(n_a, n_b) - 1 for unequal ones."""
    rng = np.random.default_rng(0)
    x = rng.random(200)
    s, t = np.array([0.10, 0.16, 0.13]), np.array([0.02, 0.09, 0.03])
    a, b = x + s[:, None], x + t[:, None]
    d = stats.paired_difference(a, b)
    welch = scipy.stats.ttest_ind(a.mean(1), b.mean(1), equal_var=False)
    low, high = welch.confidence_interval(0.95)
    assert d.diff == pytest.approx(s.mean() - t.mean())
    assert (d.low, d.high) == pytest.approx((low, high), abs=1e-9)
    assert d.df == pytest.approx(welch.df) and (d.n_images, d.seeds) == (200, (3, 3))
    # one value per run (a corpus metric, a cost): the same interval, and no image count
    r = stats.seed_difference(a.mean(1), b.mean(1))
    assert (r.low, r.high) == pytest.approx((low, high), abs=1e-9) and r.n_images is None
    # a fourth seed of b: Welch's standard error, Hsu's df
    t4 = np.array([0.02, 0.09, 0.03, 0.01])
    u = stats.paired_difference(a, x + t4[:, None])
    se = math.sqrt(s.var(ddof=1) / 3 + t4.var(ddof=1) / 4)
    half = scipy.stats.t.ppf(0.975, 2) * se
    assert (u.df, u.se) == (2, pytest.approx(se)) and u.high - u.low == pytest.approx(2 * half)


def test_images_that_disagree_about_the_difference_widen_the_interval():
    """The same seed means, but a is better on some images and worse on others (an image-by-variant
    effect): these test images are then one draw of many, and the interval says so."""
    rng = np.random.default_rng(1)
    x = rng.random(200)
    s, t = np.array([0.10, 0.16, 0.13]), np.array([0.02, 0.09, 0.03])
    swing = np.where(np.arange(200) % 2 == 0, 0.3, -0.3)  # mean 0: the seed means are unchanged
    plain = stats.paired_difference(x + s[:, None], x + t[:, None])
    swung = stats.paired_difference(x + swing + s[:, None], x + t[:, None])
    assert swung.diff == pytest.approx(plain.diff)
    # the image component is var(swing) / 200 = 0.09 / 200, exactly, next to the seeds' part
    assert swung.se**2 == pytest.approx(plain.se**2 + 0.09 * 200 / 199 / 200, rel=1e-9)


def binary_runs(rng, comparisons, seeds, images=500, accuracy_logit=0.5, seed_sd=0.2, image_sd=1.5, gap=0.0):
    """[comparisons, seeds, images] 0/1 outcomes for two variants: logit = base + image effect
    (shared by every run) + seed effect (one per run) + gap for a only."""
    image = rng.normal(0, image_sd, (comparisons, 1, images))
    a = expit(accuracy_logit + gap + image + rng.normal(0, seed_sd, (comparisons, seeds, 1)))
    b = expit(accuracy_logit + image + rng.normal(0, seed_sd, (comparisons, seeds, 1)))
    return (rng.random(a.shape) < a).astype(float), (rng.random(b.shape) < b).astype(float)


@pytest.mark.parametrize("seeds", [3, 5])
def test_with_no_true_difference_the_interval_excludes_zero_at_most_6_percent_of_the_time(seeds):
    """The demo's seed spread: per-seed accuracies 0.03-0.05 apart (checked), 500 shared images."""
    rng = np.random.default_rng(seeds)
    a, b = binary_runs(rng, 1000, seeds)
    spread = a.mean(2).std(1, ddof=1).mean()
    assert 0.03 <= spread <= 0.05
    found = np.mean([stats.paired_difference(x, y).excludes_zero for x, y in zip(a, b)])
    assert found <= 0.06, f"{found:.3f} of 1000 comparisons found a difference where there is none"


@pytest.mark.parametrize("seeds_a, seeds_b", [(2, 6), (6, 2), (2, 10), (3, 10)])
def test_with_unequal_seed_counts_the_level_still_holds(seeds_a, seeds_b):
    """Runs that diverged and were left out make the counts unequal."""
    rng = np.random.default_rng(seeds_a * 100 + seeds_b)
    a, b = binary_runs(rng, 1000, max(seeds_a, seeds_b))
    found = np.mean([stats.paired_difference(x[:seeds_a], y[:seeds_b]).excludes_zero for x, y in zip(a, b)])
    assert found <= 0.06, f"{found:.3f} of 1000 comparisons found a difference where there is none"


@pytest.mark.parametrize("seeds", [3, 5])
def test_a_difference_as_large_as_the_stated_detectable_size_is_detected_80_percent_of_the_time(seeds):
    rng = np.random.default_rng(10 + seeds)
    a, b = binary_runs(rng, 1000, seeds)
    stated = np.mean([stats.paired_difference(x, y).detectable for x, y in zip(a, b)])
    # the logit gap that moves the expected accuracy by `stated`
    image = rng.normal(0, 1.5, 200_000)
    gap = scipy.optimize.brentq(lambda g: (expit(0.5 + g + image) - expit(0.5 + image)).mean() - stated, 0, 3)
    a, b = binary_runs(rng, 1000, seeds, gap=gap)
    found = np.mean([stats.paired_difference(x, y).detected for x, y in zip(a, b)])
    assert found >= 0.8, f"a true difference of {stated:.3f} was detected in {found:.3f} of comparisons"


def test_with_an_image_by_variant_effect_the_level_still_holds():
    """Each variant has image-specific strengths (a fresh draw of test images would move the
    difference) but none on average: leaving the image component out would find differences."""
    rng = np.random.default_rng(7)
    found = []
    for _ in range(20):  # 20 batches of 50: a fresh image set each
        a, b = binary_runs(rng, 50, 3, images=300)
        logits = rng.normal(0, 0.6, (2, 300))  # the variant-by-image effect, mean 0
        a = (rng.random(a.shape) < expit(0.5 + logits[0] + rng.normal(0, 0.2, (50, 3, 1)))).astype(float)
        b = (rng.random(b.shape) < expit(0.5 + logits[1] + rng.normal(0, 0.2, (50, 3, 1)))).astype(float)
        found += [stats.paired_difference(x, y).excludes_zero for x, y in zip(a, b)]
    assert np.mean(found) <= 0.06


def test_only_images_every_run_scored_count():
    a = [[1, 1, None, 1, 0, 1], [1, 0, 1, 1, 0, None]]
    b = [[0, 1, 1, None, 0, 0], [0, 1, 1, 1, 1, 0]]
    # images 0, 1 and 4 have a value in all four runs
    assert list(stats.common_images(stats.floats(a), stats.floats(b))) == [True, True, False, False, True, False]
    d = stats.paired_difference(a, b)
    assert d.n_images == 3
    assert d.diff == pytest.approx(np.mean([(1 + 1 + 0) / 3, (1 + 0 + 0) / 3]) - np.mean([1 / 3, 2 / 3]))
    assert stats.paired_difference([[None, 1]], [[1, None]]).diff is None
    with pytest.raises(ValueError):
        stats.paired_difference([1, 0, 1], [1, 0])


def test_one_seed_gives_a_difference_but_no_interval():
    d = stats.paired_difference([1, 0, 1, 1] * 10, [0, 0, 1, 0] * 10)
    assert d.diff == pytest.approx(0.5) and d.low is None
    assert "fewer than 2 seeds" in stats.verdict(d, "A", "B")


def test_the_detectable_size_is_the_noncentral_t_solution():
    # with many df the t test is a z test: (1.959964 + 0.841621) standard errors
    assert stats.detectable_difference(0.01, 1e7) == pytest.approx(0.028016, rel=1e-4)
    # with 4 df: the power at the stated size is 0.8, checked against scipy's noncentral t
    size = stats.detectable_difference(0.02, 4)
    critical = scipy.stats.t.ppf(0.975, 4)
    assert scipy.stats.nct.sf(critical, 4, size / 0.02) == pytest.approx(0.8, abs=1e-3)
    assert stats.detectable_difference(0, 4) is None and stats.detectable_difference(0.02, None) is None


def test_verdict_words():
    d = lambda diff, low, high, n=500: stats.Difference(diff, low, high, 0.01, 4.0, n, (3, 3))
    assert stats.verdict(d(0.05, 0.02, 0.08), "A", "B") == "A ahead by 0.05 (95% CI [0.02, 0.08])"
    assert stats.verdict(d(-0.05, -0.08, -0.02), "A", "B") == "B ahead by 0.05 (95% CI [0.02, 0.08])"
    words = stats.verdict(d(0.01, -0.01, 0.03), "A", "B")
    assert words.startswith("no difference detected (95% CI [-0.01, 0.03] covers 0; it could have detected about 0.0")
    # for a cost the lower one is ahead
    assert stats.verdict(d(0.05, 0.02, 0.08), "A", "B", lower_is_better=True) == "B ahead by 0.05 (95% CI [0.02, 0.08])"
    # too few images to say anything, whatever the interval
    few = d(0.3, 0.1, 0.5, n=stats.MIN_IMAGES - 1)
    assert stats.verdict(few, "A", "B").startswith("too few images") and not few.detected
    assert stats.verdict(stats.Difference(None, None, None), "A", "B").startswith("no comparison")
