"""Random unit directions, optionally shaped by the residual covariance.

Vector ``i`` comes from its own generator seeded by ``(seed, i)``, so it is the same vector
whatever ``num_noise_vectors`` is. Shaping follows the seed: ``u ~ N(0, I)`` normalised,
``v = cov_sqrt @ u`` renormalised; generation multiplies by each scale, so the vector added to
the residual stream has exactly the requested norm.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from residlab.errors import UsageError

__all__ = ["find_cov_sqrt", "load_cov_sqrt", "noise_vector", "noise_vectors"]

log = logging.getLogger(__name__)


def noise_vector(seed: int, index: int, d_model: int, cov_sqrt: np.ndarray | None = None):
    """Unit vector ``index`` of the bank seeded by ``seed``: ``(d_model,)`` float64."""
    u = np.random.default_rng([seed, index]).standard_normal(d_model)  # (D,)
    u /= np.linalg.norm(u)
    if cov_sqrt is None:
        return u
    v = cov_sqrt @ u  # (D,)
    norm = np.linalg.norm(v)
    if not np.isfinite(norm) or norm == 0:
        raise UsageError("cov_sqrt maps a noise direction to zero; re-estimate the covariance")
    return v / norm


def noise_vectors(seed: int, count: int, d_model: int, cov_sqrt: np.ndarray | None = None):
    """``(count, d_model)`` float64 unit vectors, row i equal to ``noise_vector(seed, i, ...)``."""
    return np.stack([noise_vector(seed, i, d_model, cov_sqrt) for i in range(count)])


def load_cov_sqrt(path: str | Path, d_model: int) -> np.ndarray:
    """Read and check a ``(d_model, d_model)`` finite matrix."""
    path = Path(path)
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read cov_sqrt {str(path)!r}: {error}") from None
    if matrix.shape != (d_model, d_model):
        raise UsageError(
            f"cov_sqrt {str(path)!r} has shape {matrix.shape} but the model's hidden size is "
            f"{d_model}; estimate it for this model with 'residlab noise covariance'"
        )
    if not np.isfinite(matrix).all():
        raise UsageError(f"cov_sqrt {str(path)!r} contains NaN or infinite values; re-estimate it")
    return matrix.astype(np.float64)


def find_cov_sqrt(output_dir: str | Path, explicit: str | None) -> Path | None:
    """The cov_sqrt to shape with: ``explicit``, else the latest ``cov/<ts>/``, else
    ``<output_dir>/cov_sqrt.npy``, else None."""
    if explicit:
        if not Path(explicit).is_file():
            raise UsageError(f"cov_sqrt file {explicit!r} not found")
        return Path(explicit)
    estimates = sorted(path for path in Path(output_dir).glob("cov/*/cov_sqrt.npy")
                       if not path.parent.name.startswith("."))
    if estimates:
        return estimates[-1]
    flat = Path(output_dir) / "cov_sqrt.npy"
    return flat if flat.is_file() else None
