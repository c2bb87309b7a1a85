"""
How sure a comparison of two variants is: a t interval over seeds, a paired bootstrap over test
images (and seeds), and the verdict in words. None and NaN entries mean "does not apply" throughout.
"""

import numpy as np
from scipy import stats as scipy_stats


def _floats(values):
    x = np.asarray(values, dtype=object)
    return np.where(np.equal(x, None), np.nan, x).astype(float)


def mean_interval(values, confidence=0.95):
    """(mean, low, high): the mean of the finite values (one per seed) and its t interval.

    The bounds are None when fewer than two values are finite (no spread to estimate), and all
    three are None when none is. Equal values give low == high == mean."""
    x = _floats(values).ravel()
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


def _paired_mean(a, b):
    """Mean over images of (mean of a over its seeds) - (mean of b over its seeds), over the
    images where both have at least one finite value; NaN when there is none."""
    fa, fb = np.isfinite(a), np.isfinite(b)
    na, nb = fa.sum(0), fb.sum(0)
    both = (na > 0) & (nb > 0)
    if not both.any():
        return np.nan
    ma = np.where(fa, a, 0).sum(0)[both] / na[both]
    mb = np.where(fb, b, 0).sum(0)[both] / nb[both]
    return float((ma - mb).mean())


def paired_difference(a, b, confidence=0.95, n_resamples=2000, seed=0):
    """(difference, low, high): mean of a - b over the test images and its bootstrap interval.

    a and b hold per-image scores of two variants on the same test images, shape [n_images] or
    [n_seeds, n_images] (the seed counts of a and b may differ). None/NaN entries are left out
    pairwise: an image counts where both variants have a value (with seeds: any seed's value).
    Each resample draws the test images with replacement, the same draw for both variants (the
    pairing), and with seeds also draws each variant's seeds with replacement. Percentile interval.
    low/high are None when no image has both values."""
    a, b = np.atleast_2d(_floats(a)), np.atleast_2d(_floats(b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must be [n_images] or [n_seeds, n_images] on the same images: shapes {a.shape} and {b.shape}"
        )
    diff = _paired_mean(a, b)
    if np.isnan(diff):
        return None, None, None
    rng = np.random.default_rng(seed)
    n_images = a.shape[1]
    replicates = np.empty(n_resamples)
    for k in range(n_resamples):
        images = rng.integers(n_images, size=n_images)
        # seed k of one variant is a separate training run from seed k of the other, so each
        # variant's seeds are drawn on their own; the images are shared, so they are drawn once
        sa = rng.integers(len(a), size=len(a))
        sb = rng.integers(len(b), size=len(b))
        replicates[k] = _paired_mean(a[sa][:, images], b[sb][:, images])
    replicates = replicates[np.isfinite(replicates)]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return diff, float(low), float(high)


def verdict(diff, low, high, name_a, name_b, confidence=0.95):
    """Plain words for a paired_difference result (of a - b)."""
    level = f"{100 * confidence:g}% CI"
    if diff is None or low is None or high is None:
        return f"no comparison: no image scored for both {name_a} and {name_b}"
    if low > 0:
        return f"{name_a} ahead by {diff:.3f} ({level} [{low:.3f}, {high:.3f}])"
    if high < 0:
        return f"{name_b} ahead by {-diff:.3f} ({level} [{-high:.3f}, {-low:.3f}])"
    return f"no difference detected ({level} [{low:.3f}, {high:.3f}] covers 0)"
