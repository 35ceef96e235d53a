"""Random unit directions, optionally shaped by the residual covariance.

Vector ``i`` comes from its own generator seeded by ``(seed, i)``, so it is the same vector
whatever ``num_noise_vectors`` is. Shaping follows the seed: ``u ~ N(0, I)`` normalised,
``v = cov_sqrt @ u`` renormalised; generation multiplies by each scale, so the vector added to
the residual stream has exactly the requested norm.

A covariance describes one model at one site, so every estimate carries ``estimate.json``
(model identity, layer, site, ...) and an estimate is only picked up automatically when it
was made for the same model, layer and site as the run. A file without that record (made by
hand or by an older version) is used only when named explicitly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from residlab.errors import UsageError

__all__ = [
    "ESTIMATE_FILE",
    "EstimateKey",
    "find_cov_sqrt",
    "load_cov_sqrt",
    "model_identity",
    "noise_vector",
    "noise_vectors",
    "read_estimate",
]

log = logging.getLogger(__name__)

ESTIMATE_FILE = "estimate.json"
# Provenance keys that say which weights ran; dtype, device and library versions do not.
IDENTITY_KEYS = ("source", "model", "revision", "config_sha256", "sha256", "lora")
NPY_MAGIC = b"\x93NUMPY"


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
        with path.open("rb") as handle:
            is_npy = handle.read(len(NPY_MAGIC)) == NPY_MAGIC
        # Checked first: np.load calls any other file "pickled data".
        matrix = np.load(path, allow_pickle=False) if is_npy else None
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read cov_sqrt {str(path)!r}: {error}") from None
    if matrix is None:
        raise UsageError(
            f"cov_sqrt {str(path)!r} is not a NumPy array file (.npy); give the cov_sqrt.npy "
            "written by 'residlab noise covariance'")
    if matrix.shape != (d_model, d_model):
        raise UsageError(
            f"cov_sqrt {str(path)!r} has shape {matrix.shape} but the model's hidden size is "
            f"{d_model}; estimate it for this model with 'residlab noise covariance'"
        )
    if matrix.dtype.kind not in "fiu" or not np.isfinite(matrix).all():
        raise UsageError(f"cov_sqrt {str(path)!r} contains NaN, infinite or non-real values; "
                         "re-estimate it")
    return matrix.astype(np.float64)


def model_identity(provenance: dict[str, Any]) -> dict[str, Any]:
    """The part of a model's provenance that says which weights ran: hub id + revision, local
    path + config hash, or the embedded file's sha256 (plus a LoRA adapter, if any)."""
    return {key: provenance[key] for key in IDENTITY_KEYS if provenance.get(key) is not None}


@dataclass(frozen=True)
class EstimateKey:
    """What an estimate must have been made for to shape a run's noise automatically."""

    model: dict[str, Any]  # model_identity(...)
    layer_index: int  # normalised, non-negative
    site: str

    def describe(self) -> str:
        return f"model {_model_label(self.model)}, layer {self.layer_index}, {self.site}"

    def differences(self, record: dict[str, Any]) -> list[str]:
        """What an estimate's record has that this key does not, e.g. ``layer_index 1 (this
        run: 2)``; empty when it matches."""
        found = []
        if record.get("model") != self.model:
            theirs, ours = record.get("model") or {}, self.model
            # Show hashes only when the names alone do not tell the two models apart.
            brief = theirs.get("model") != ours.get("model")
            found.append(f"model {_model_label(theirs, brief)} "
                         f"(this run: {_model_label(ours, brief)})")
        for key in ("layer_index", "site"):
            if record.get(key) != getattr(self, key):
                found.append(f"{key} {record.get(key)} (this run: {getattr(self, key)})")
        return found


def _model_label(identity: dict[str, Any], brief: bool = False) -> str:
    label = str(identity.get("model", "unknown"))
    if brief:
        return label
    for key in ("revision", "config_sha256", "sha256"):
        if identity.get(key):
            label += f" {key.replace('_', ' ')} {str(identity[key])[:12]}"
    return label + (f" + LoRA {identity['lora']}" if identity.get("lora") else "")


def read_estimate(cov_sqrt: str | Path) -> dict[str, Any] | None:
    """The provenance record beside a ``cov_sqrt.npy``, or None when it has none."""
    record = Path(cov_sqrt).with_name(ESTIMATE_FILE)
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _candidates(output_dir: Path) -> list[Path]:
    """Every cov_sqrt under ``output_dir``, newest first (the flat legacy file last)."""
    estimates = sorted((path for path in output_dir.glob("cov/*/cov_sqrt.npy")
                        if not path.parent.name.startswith(".")), reverse=True)
    flat = output_dir / "cov_sqrt.npy"
    return estimates + ([flat] if flat.is_file() else [])


def _explicit(path: Path, want: EstimateKey | None) -> Path:
    """A file named by the user wins, with a warning when it was made for something else."""
    if not path.is_file():
        raise UsageError(f"cov_sqrt file {str(path)!r} not found; give an existing cov_sqrt.npy "
                         "or drop cov_sqrt_path / --cov-sqrt to use a matching estimate")
    record = read_estimate(path)
    differs = want.differences(record) if want is not None and record is not None else []
    if differs:
        log.warning("cov_sqrt %s was estimated for %s; using it because it was given explicitly",
                    path, "; ".join(differs))
    elif record is None:
        log.info("cov_sqrt %s has no %s: its model, layer and site are unknown",
                 path, ESTIMATE_FILE)
    return path


def find_cov_sqrt(
    output_dir: str | Path, explicit: str | Path | None, *, want: EstimateKey | None = None,
) -> Path | None:
    """The cov_sqrt to shape with: ``explicit`` (always), else the newest estimate under
    ``output_dir/cov/`` made for ``want`` (any estimate with a record when ``want`` is None),
    else None when there is no estimate at all.

    Estimates exist but none fits: a UsageError naming what differs in the newest one.
    """
    if explicit:
        return _explicit(Path(explicit), want)
    candidates = _candidates(Path(output_dir))
    records = [read_estimate(path) for path in candidates]
    for path, record in zip(candidates, records, strict=True):
        if record is not None and (want is None or not want.differences(record)):
            return path
    if not candidates:
        return None
    wanted = f" ({want.describe()})" if want is not None else ""
    raise UsageError(
        f"none of the {len(candidates)} covariance estimate(s) under {str(output_dir)!r} fits "
        f"this run{wanted}: the newest, {candidates[0]}, {_mismatch(records[0], want)}; run "
        "'residlab noise covariance' with this config, pass --cov-sqrt FILE to use a file "
        "anyway, or set shape_noise: false")


def _mismatch(record: dict[str, Any] | None, want: EstimateKey | None) -> str:
    if record is None or want is None:
        return f"has no {ESTIMATE_FILE}, so its model, layer and site are unknown"
    return "was made for " + ", ".join(want.differences(record))
