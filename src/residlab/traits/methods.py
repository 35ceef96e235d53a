"""Direction-finding methods and their held-out evaluation.

All methods take paired class activations ``positive`` / ``negative`` ``(n, d)`` (row i of
each comes from the same scenario) and return a direction ``(d,)`` pointing from negative to
positive. Evaluation projects held-out pairs onto the unit direction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from residlab.errors import UsageError

__all__ = ["METHODS", "Evaluation", "Fitted", "evaluate", "fit", "fit_direction", "split_pairs"]


def mean_diff(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Difference of class means."""
    return positive.mean(axis=0) - negative.mean(axis=0)


def probe(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Logistic-regression weights on row-normalised activations (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([positive, negative])  # (2n, d)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    model = LogisticRegression(max_iter=2000, C=1.0).fit(x, y)
    return model.coef_[0].astype(np.float64)


def pca(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """First principal direction of the paired differences (uncentred, so the shared shift is
    the signal), signed to agree with the mean difference."""
    diffs = positive - negative  # (n, d)
    direction = np.linalg.svd(diffs, full_matrices=False)[2][0]  # (d,)
    return direction if diffs.mean(axis=0) @ direction >= 0 else -direction


METHODS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "mean_diff": mean_diff, "probe": probe, "pca": pca,
}


@dataclass(frozen=True)
class Fitted:
    """A direction oriented so that the positive class projects higher on the training data."""

    direction: np.ndarray  # (d,)
    flipped: bool  # the method's own sign was reversed by the orientation
    pair_accuracy: float  # share of training pairs whose positive side projects higher


def _pair_accuracy(direction: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    gaps = (positive - negative) @ direction  # (n,) per pair: positive minus negative
    return float((gaps > 0).mean())


def fit(method: str, positive: np.ndarray, negative: np.ndarray) -> Fitted:
    """Fit ``method`` and orient the result. The sign of a PCA direction (and of a probe on a
    degenerate split) is arbitrary, and a sign taken from the mean difference follows a few
    outlier pairs; so the sign under which most training pairs put their positive side higher
    wins (a tie keeps the side of the mean difference)."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; use {', '.join(METHODS)}")
    positive, negative = positive.astype(np.float64), negative.astype(np.float64)
    direction = METHODS[method](positive, negative)  # (d,)
    accuracy = _pair_accuracy(direction, positive, negative)
    flipped_accuracy = _pair_accuracy(-direction, positive, negative)
    mean_gap = (positive.mean(axis=0) - negative.mean(axis=0)) @ direction
    flip = flipped_accuracy > accuracy or (flipped_accuracy == accuracy and mean_gap < 0)
    if flip:
        direction, accuracy = -direction, flipped_accuracy
    return Fitted(direction, bool(flip), accuracy)


def fit_direction(method: str, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """The oriented direction of :func:`fit` ``(d,)``."""
    return fit(method, positive, negative).direction


def split_pairs(n_pairs: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / test pair indices; at least one pair on each side."""
    if not 0 < test_fraction < 1:
        raise UsageError(f"test fraction {test_fraction} must be between 0 and 1")
    order = np.random.default_rng(seed).permutation(n_pairs)
    n_test = min(max(1, round(n_pairs * test_fraction)), n_pairs - 1)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


@dataclass(frozen=True)
class Evaluation:
    accuracy: float  # held-out, threshold at the midpoint of the training class means
    effect_size: float  # Cohen's d of held-out projections (positive vs negative)
    baseline: float  # projection of the midpoint of the training class means
    norm: float  # norm of the raw direction


def _cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1))
                     / max(len(a) + len(b) - 2, 1)) if len(a) + len(b) > 2 else 0.0
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else 0.0


def evaluate(direction: np.ndarray, train: tuple[np.ndarray, np.ndarray],
             test: tuple[np.ndarray, np.ndarray]) -> Evaluation:
    """Accuracy and effect size on ``test`` = (positive, negative) pairs."""
    unit = direction / max(np.linalg.norm(direction), 1e-12)
    baseline = float((train[0].mean(axis=0) + train[1].mean(axis=0)) / 2 @ unit)
    pos, neg = test[0] @ unit, test[1] @ unit
    accuracy = float(((pos > baseline).sum() + (neg <= baseline).sum()) / (len(pos) + len(neg)))
    return Evaluation(accuracy, _cohens_d(pos, neg), baseline, float(np.linalg.norm(direction)))
