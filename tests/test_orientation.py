"""Every method's vector is oriented so the positive class projects higher on training data."""

from __future__ import annotations

import numpy as np
import pytest

from residlab.traits.methods import METHODS, fit, fit_direction


def _outlier_pairs(n: int = 20, d: int = 8, seed: int = 0):
    """Most pairs put the positive side *lower* along x; one huge pair puts it far higher, so
    the mean difference (and a PCA signed by it) points the minority's way."""
    rng = np.random.default_rng(seed)
    negative = rng.standard_normal((n, d)) * 0.1
    positive = negative.copy()
    positive[:, 0] -= 1.0  # the majority: positive lower on x
    positive[0, 0] += 60.0  # one outlier pair: positive far higher
    return positive, negative


def test_pca_sign_follows_the_majority_not_an_outlier():
    positive, negative = _outlier_pairs()
    mean_gap = (positive.mean(0) - negative.mean(0))[0]
    assert mean_gap > 0  # the old rule (sign of the mean difference) picks +x
    fitted = fit("pca", positive, negative)
    assert fitted.flipped is True and fitted.direction[0] < 0
    assert fitted.pair_accuracy == pytest.approx(19 / 20)
    assert np.array_equal(fit_direction("pca", positive, negative), fitted.direction)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("seed", range(5))
def test_every_method_is_at_least_chance_on_training_data(method, seed):
    rng = np.random.default_rng(seed)
    positive, negative = rng.standard_normal((12, 6)), rng.standard_normal((12, 6))
    fitted = fit(method, positive, negative)
    gaps = (positive - negative) @ fitted.direction  # oracle: count the pairs by hand
    assert fitted.pair_accuracy == pytest.approx((gaps > 0).mean())
    assert (gaps > 0).sum() >= (gaps < 0).sum()
