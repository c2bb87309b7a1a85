"""
How sure a comparison of two variants is: a t interval over seeds, an interval for a difference
that has seeds as its unit and the test images as a second source of variance, the smallest
difference an experiment could have detected, and the verdict in words. None and NaN entries mean
"does not apply" throughout.

Why this interval and not a bootstrap: with 2-5 seeds a variant, resampling the seeds sees about
(n-1)/n of their variance and uses normal-like quantiles where a t with few degrees of freedom
applies, and a simulated comparison with no true difference then claimed one 9-16% of the time at
3 seeds. Welch's t over the per-seed means is exact for normal seed effects with unequal variances
and holds its level at these counts (tests/test_stats.py simulates it). The one thing it leaves out
is that the test images are a sample too: a variant can be better on these images and not on new
ones. That image-by-variant component is estimated from a two-way decomposition of the per-image
scores and added, with its own degrees of freedom, by Welch-Satterthwaite. scipy, statsmodels and
rliable offer the parts (Welch's t, bootstraps) but not this two-level interval, hence by hand.
"""

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special
from scipy import stats as scipy_stats

MIN_IMAGES = 30  # below this many images a row says too few to compare instead of a verdict
POWER = 0.8  # the smallest detectable difference is the one detected this often


def floats(values):
    x = np.asarray(values, dtype=object)
    return np.where(np.equal(x, None), np.nan, x).astype(float)


def mean_interval(values, confidence=0.95):
    """(mean, low, high): the mean of the finite values (one per seed) and its t interval.

    The bounds are None when fewer than two values are finite (no spread to estimate), and all
    three are None when none is. Equal values give low == high == mean."""
    x = floats(values).ravel()
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return None, None, None
    mean = float(x.mean())
    if len(x) == 1:
        return mean, None, None
    sem = float(x.std(ddof=1) / np.sqrt(len(x)))
    if sem == 0:
        return mean, mean, mean
    low, high = scipy_stats.t.interval(confidence, df=len(x) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


@dataclass
class Difference:
    """a - b with its interval. se and df are those of the t interval; detectable is the smallest
    true difference the experiment finds with probability POWER. None where it cannot be said."""

    diff: float | None
    low: float | None
    high: float | None
    se: float | None = None
    df: float | None = None
    n_images: int | None = 0  # None: a figure of whole runs (a corpus metric, a cost)
    seeds: tuple = (0, 0)
    confidence: float = 0.95

    @property
    def detectable(self):
        """se is itself estimated, from few seeds, and low more often than high (the sample SD's mean is
        c4 < 1 times the true one): it is scaled up by 1 / c4 so that the stated size holds on average."""
        if self.se is None or self.df is None:
            return None
        c4 = np.sqrt(2 / self.df) * np.exp(special.gammaln((self.df + 1) / 2) - special.gammaln(self.df / 2))
        return detectable_difference(self.se / c4, self.df, self.confidence)

    @property
    def excludes_zero(self):
        return self.low is not None and (self.low > 0 or self.high < 0)

    @property
    def detected(self):
        """A difference the verdict names: the interval excludes zero on enough images."""
        return self.excludes_zero and (self.n_images is None or self.n_images >= MIN_IMAGES)


def detectable_difference(se, df, confidence=0.95, power=POWER):
    """The true difference that a two-sided t test at this level rejects with probability `power`,
    for an estimate with standard error se and df degrees of freedom (the noncentral t)."""
    if se is None or not se > 0 or df is None or not df > 0:
        return None
    critical = scipy_stats.t.ppf(1 - (1 - confidence) / 2, df)

    def shortfall(delta):
        nc = delta / se
        wrong_side = np.nan_to_num(scipy_stats.nct.cdf(-critical, df, nc))  # ~0; scipy gives NaN far out
        detected = scipy_stats.nct.sf(critical, df, nc) + wrong_side
        return detected - power

    return float(optimize.brentq(shortfall, 0.0, 3 * critical * se))  # 3 x critical is detected > 99%


def _welch_satterthwaite(parts):
    """(total variance, degrees of freedom) of a sum of independent variance estimates [(v, df)]."""
    total = sum(v for v, _ in parts)
    denominator = sum(v * v / df for v, df in parts if v > 0)
    return total, (total * total / denominator if denominator > 0 else None)


def _residual_variance(x):
    """The within-run noise of per-image scores x [n_seeds, n_images]: the mean square left after
    the seed and image main effects (two-way layout, one value per cell)."""
    r = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()
    n, m = x.shape
    return float((r * r).sum() / ((n - 1) * (m - 1)))


def common_images(a, b):
    """The images where every run of both variants has a value ([n_images] bool)."""
    return np.isfinite(a).all(0) & np.isfinite(b).all(0)


def paired_difference(a, b, confidence=0.95):
    """Difference of mean per-image scores, a - b, with a t interval over seeds and images.

    a and b hold per-image scores of two variants on the same test images, [n_seeds, n_images]
    (the seed counts may differ) or [n_images] for one run. Only the images where every run of
    both has a value count, the same images for both columns and the difference.

    The estimate is the difference of the means of the per-seed means. Its variance adds
    var(per-seed means of a) / n_a, the same for b, and the image-by-variant variance over the
    number of images: the variance over images of the per-image mean difference less what the
    within-run noise puts there (each variant's two-way residual mean square over its seeds).
    The degrees of freedom are Welch-Satterthwaite's, with the seed parts' taken as Hsu's
    min(n_a, n_b) - 1 when the seed counts differ.
    A seed-level or image-level estimate that cannot be made (one seed, no images) gives no interval."""
    a, b = np.atleast_2d(floats(a)), np.atleast_2d(floats(b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must be [n_images] or [n_seeds, n_images] on the same images: shapes {a.shape} and {b.shape}"
        )
    keep = common_images(a, b)
    a, b = a[:, keep], b[:, keep]
    n_a, n_b, n_images = len(a), len(b), int(keep.sum())
    if n_images == 0:
        return Difference(None, None, None, n_images=0, seeds=(n_a, n_b))
    seed_means_a, seed_means_b = a.mean(1), b.mean(1)
    diff = float(seed_means_a.mean() - seed_means_b.mean())
    if n_a < 2 or n_b < 2:
        return Difference(diff, None, None, n_images=n_images, seeds=(n_a, n_b))
    seed_parts = [(seed_means_a.var(ddof=1) / n_a, n_a - 1), (seed_means_b.var(ddof=1) / n_b, n_b - 1)]
    if n_a != n_b:
        # Welch-Satterthwaite's df is liberal when one side has very few seeds (2 against 6 found
        # a difference 8% of the time with none there): Hsu's min(n_a, n_b) - 1 holds the level
        seed_parts = [(seed_parts[0][0] + seed_parts[1][0], min(n_a, n_b) - 1)]
    parts = list(seed_parts)
    if n_images > 1:
        per_image = a.mean(0) - b.mean(0)
        noise = _residual_variance(a) / n_a + _residual_variance(b) / n_b
        interaction = max(float(per_image.var(ddof=1)) - noise, 0.0)
        parts.append((interaction / n_images, n_images - 1))
    variance, df = _welch_satterthwaite(parts)
    se = float(np.sqrt(variance))
    if se == 0 or df is None:
        return Difference(diff, diff, diff, 0.0, None, n_images, (n_a, n_b))
    half = float(scipy_stats.t.ppf(1 - (1 - confidence) / 2, df)) * se
    return Difference(diff, diff - half, diff + half, se, df, n_images, (n_a, n_b), confidence)


def seed_difference(a, b, confidence=0.95):
    """The same for one value per run (a corpus metric, a cost): Welch's t over the runs, the
    interval above with no image component."""
    a, b = (floats(x).ravel() for x in (a, b))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not (len(a) and len(b)):
        return Difference(None, None, None, n_images=None)
    d = paired_difference(a[:, None], b[:, None], confidence)
    d.n_images = None  # not a per-image figure: no image count to judge
    return d


def verdict(d, name_a, name_b, confidence=0.95, lower_is_better=False):
    """Plain words for a Difference of a - b. "ahead" means better: for a cost the lower one."""
    level = f"{100 * confidence:g}% CI"
    if d.diff is None:
        return f"no comparison: no image scored for both {name_a} and {name_b}"
    if d.n_images is not None and d.n_images < MIN_IMAGES:
        return f"too few images to compare ({d.n_images} < {MIN_IMAGES})"
    if d.low is None:
        return "no interval: a variant has fewer than 2 seeds"
    diff, low, high = (-d.diff, -d.high, -d.low) if lower_is_better else (d.diff, d.low, d.high)
    if low > 0:
        return f"{name_a} ahead by {diff:.3g} ({level} [{low:.3g}, {high:.3g}])"
    if high < 0:
        return f"{name_b} ahead by {-diff:.3g} ({level} [{-high:.3g}, {-low:.3g}])"
    could = "" if d.detectable is None else f"; it could have detected about {d.detectable:.3g}"
    return f"no difference detected ({level} [{low:.3g}, {high:.3g}] covers 0{could})"
