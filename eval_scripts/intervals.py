"""95% intervals for the numbers a run reports.

* ``binomial_interval``: the exact (Clopper-Pearson) interval of a proportion, for accuracies whose items are
  scored 0 or 1 once each. It never leaves [0, 1] and is conservative (covers at least the level asked for).
* ``bootstrap_interval``: the percentile bootstrap of a mean over items, for scores in [0, 1] that are not 0/1
  (F1) or for an accuracy averaged over templates per item. Resampling is seeded, so a run's interval is the
  same every time it is computed.
* ``paired_interval``: the paired bootstrap of the mean difference ``fused - text_only`` over the same items
  (each resample draws items, and both scores of a drawn item move together), for the gain images bring.

All three take and return fractions; callers print percentages. ``docs/protocols.md`` says which metric
uses which.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0


def binomial_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Clopper-Pearson interval of ``successes / n``: the Beta quantiles at (1 - level) / 2 and 1 - that."""
    if n < 1:
        raise ValueError("an interval needs at least one item")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within 0..{n}, got {successes}")
    from scipy.stats import beta

    alpha = 1.0 - level
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return low, high


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` rows of ``n`` item indices drawn with replacement (seeded)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_interval(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
                       seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per item)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < 1:
        raise ValueError("an interval needs at least one item")
    means = x[_draws(x.size, resamples, seed)].mean(axis=1)
    return _percentiles(means, level)


def paired_interval(fused: Sequence[float], text_only: Sequence[float], level: float = LEVEL,
                    resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Paired bootstrap interval of ``mean(fused) - mean(text_only)`` over the same items, in order."""
    a, b = np.asarray(fused, dtype=np.float64), np.asarray(text_only, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 1:
        raise ValueError("a paired interval needs the same items, at least one, scored both ways")
    diffs = (a - b)[_draws(a.size, resamples, seed)].mean(axis=1)
    return _percentiles(diffs, level)


def interval_of(values: Sequence[float], level: float = LEVEL) -> dict:
    """The interval a list of per-item scores gets: exact binomial when every score is 0 or 1, else bootstrap.

    Returns ``{"low", "high", "method", "n"}`` in percent."""
    x = [float(v) for v in values]
    if all(v in (0.0, 1.0) for v in x):
        low, high = binomial_interval(int(sum(x)), len(x), level)
        method = "clopper-pearson"
    else:
        low, high = bootstrap_interval(x, level)
        method = "bootstrap"
    return {"low": 100 * low, "high": 100 * high, "method": method, "n": len(x)}


def gain_of(fused: Sequence[float], text_only: Sequence[float], level: float = LEVEL) -> dict:
    """The gain of fused over text-only and its paired-bootstrap interval, in percentage points.

    Returns ``{"value", "low", "high", "method", "n"}``."""
    low, high = paired_interval(fused, text_only, level)
    value = float(np.mean(np.asarray(fused, dtype=np.float64) - np.asarray(text_only, dtype=np.float64)))
    return {"value": 100 * value, "low": 100 * low, "high": 100 * high, "method": "paired bootstrap",
            "n": len(fused)}
