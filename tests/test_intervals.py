"""The intervals against hand-computed and textbook values."""
import math

import pytest

from eval_scripts.intervals import binomial_interval, bootstrap_interval, gain_of, interval_of, paired_interval


def _binom_tail_ge(k, n, p):
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_clopper_pearson_is_the_exact_interval():
    low, high = binomial_interval(7, 10)
    # textbook values for 7 of 10 at 95%
    assert low == pytest.approx(0.3475, abs=1e-4) and high == pytest.approx(0.9333, abs=1e-4)
    # and the definition: P(X >= 7 | low) = 2.5%, P(X <= 7 | high) = 2.5%
    assert _binom_tail_ge(7, 10, low) == pytest.approx(0.025, abs=1e-9)
    assert 1 - _binom_tail_ge(8, 10, high) == pytest.approx(0.025, abs=1e-9)


def test_clopper_pearson_edges():
    assert binomial_interval(0, 4) == (0.0, pytest.approx(1 - 0.025 ** (1 / 4)))
    assert binomial_interval(4, 4) == (pytest.approx(0.025 ** (1 / 4)), 1.0)
    with pytest.raises(ValueError):
        binomial_interval(0, 0)
    with pytest.raises(ValueError):
        binomial_interval(5, 4)


def test_interval_of_picks_the_method():
    exact = interval_of([1, 0, 1, 1, 1, 0, 1, 1, 0, 1])
    assert exact["method"] == "clopper-pearson" and exact["n"] == 10
    assert exact["low"] == pytest.approx(34.75, abs=0.01) and exact["high"] == pytest.approx(93.33, abs=0.01)
    boot = interval_of([0.5, 0.25, 1.0, 0.75])
    assert boot["method"] == "bootstrap" and boot["low"] <= 62.5 <= boot["high"]


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = [0.1 * i for i in range(11)]
    assert bootstrap_interval(values) == bootstrap_interval(values)
    low, high = bootstrap_interval(values)
    assert low < 0.5 < high
    assert bootstrap_interval([0.3] * 5) == (pytest.approx(0.3), pytest.approx(0.3))


def test_paired_gain_excludes_zero_when_images_only_fix():
    text = [0] * 60 + [1] * 40
    fused = [1] * 30 + [0] * 30 + [1] * 40      # 30 fixed, none broken
    gain = gain_of(fused, text)
    assert gain["value"] == pytest.approx(30.0) and gain["low"] > 0


def test_paired_gain_includes_zero_when_fixed_equals_broke():
    text = [0] * 20 + [1] * 20 + [0] * 30 + [1] * 30
    fused = [1] * 20 + [0] * 20 + [0] * 30 + [1] * 30  # 20 fixed, 20 broken
    gain = gain_of(fused, text)
    assert gain["value"] == pytest.approx(0.0) and gain["low"] < 0 < gain["high"]
    with pytest.raises(ValueError):
        paired_interval([1, 0], [1])
