"""Massive-dims calibration: per layer, the mean response activation, the dimensions with the
largest |mean| and how far they stand out, and the typical token norm (of the residual, and
of the attention and MLP contributions: ``attn_mean_norm``, ``mlp_mean_norm``).

A few residual dimensions carry huge, nearly constant values; projections are dominated by
them unless you know where they are. ``residlab calibrate`` generates responses to a
calibration prompt set, captures them in memory (nothing written per prompt) and saves
``experiments/{exp}/inference/{variant}/massive_activations/calibration.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from residlab.arch import resolve_arch
from residlab.experiments import Experiment, load_variant
from residlab.inference.capture import capture_records
from residlab.inference.responses import generate_responses, read_response
from residlab.progress import progress
from residlab.store import write_json

__all__ = ["MassiveDims", "MassiveDimsFitter", "calibration_path", "run_calibration"]


CONTRIBUTIONS = {"attn_contribution": "attn_mean_norm", "mlp_contribution": "mlp_mean_norm"}


def calibration_path(experiment: Experiment, variant: str) -> Path:
    return experiment.inference_dir(variant) / "massive_activations" / "calibration.json"


@dataclass(frozen=True)
class MassiveDims:
    """One layer's result."""

    mean: np.ndarray  # (d,) mean response activation
    dims: list[int]  # largest |mean| first
    values: list[float]  # mean value of each of those dims
    ratio: list[float]  # |mean| of the dim over the median |mean| of all dims
    mean_norm: float  # average token norm
    count: int


class MassiveDimsFitter:
    """Streaming float64 sums per layer; ``result(top_k)`` freezes them."""

    def __init__(self) -> None:
        self.sums: dict[int, np.ndarray] = {}
        self.norms: dict[int, float] = {}
        self.counts: dict[int, int] = {}

    def update(self, layer: int, tokens: torch.Tensor | np.ndarray) -> None:
        """Add ``(n, d)`` activations of one layer."""
        x = np.asarray(tokens.float() if isinstance(tokens, torch.Tensor) else tokens,
                       dtype=np.float64)
        self.sums[layer] = self.sums.get(layer, 0) + x.sum(axis=0)
        self.norms[layer] = self.norms.get(layer, 0.0) + float(np.linalg.norm(x, axis=1).sum())
        self.counts[layer] = self.counts.get(layer, 0) + x.shape[0]

    def result(self, top_k: int = 8) -> dict[int, MassiveDims]:
        out = {}
        for layer, total in sorted(self.sums.items()):
            count = self.counts[layer]
            if count == 0:
                continue
            mean = total / count
            magnitude = np.abs(mean)
            order = np.argsort(-magnitude, kind="stable")[:top_k]
            typical = max(float(np.median(magnitude)), 1e-12)
            out[layer] = MassiveDims(mean, [int(i) for i in order],
                                     [float(mean[i]) for i in order],
                                     [float(magnitude[i] / typical) for i in order],
                                     self.norms[layer] / count, count)
        return out


def run_calibration(
    experiment: Experiment, *, variant: str | None = None, prompt_set: str = "calibration",
    top_k: int = 8, max_new_tokens: int = 32, batch_size: int = 8, loaded=None,
) -> Path:
    """Responses for the calibration set (kept), in-memory capture, calibration.json."""
    variant_name, _ = experiment.variant(variant)
    loaded = loaded or load_variant(experiment, variant_name)
    generate_responses(experiment, prompt_set, variant=variant_name, skip_existing=True,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, loaded=loaded)
    paths = sorted(experiment.responses_dir(variant_name, prompt_set).glob("*.json"))
    records = sorted((read_response(p) for p in paths), key=lambda r: len(r["token_ids"]))
    arch = resolve_arch(loaded.model)
    layers = list(range(arch.n_layers))
    fitter = MassiveDimsFitter()
    # the attention and MLP contributions' norms too, where the family's table names them
    parts = ["residual"] + (list(CONTRIBUTIONS) if arch.attn_name and arch.mlp_name else [])
    norms = {(part, layer): [0.0, 0] for part in parts[1:] for layer in layers}
    bar = progress(total=len(records), desc="calibration", unit="responses")
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        captured = capture_records(loaded.model, arch, batch, layers, parts,
                                   pad_id=loaded.tokenizer.pad_token_id or 0,
                                   response_only=True, dtype=torch.float32)
        for tensors in captured:
            for layer in layers:
                fitter.update(layer, tensors[f"response.layer{layer}.residual"])
                for part in parts[1:]:
                    values = tensors[f"response.layer{layer}.{part}"]  # (n, d)
                    norms[part, layer][0] += float(values.double().norm(dim=-1).sum())
                    norms[part, layer][1] += values.shape[0]
        bar.update(len(batch))
    bar.close()
    result = fitter.result(top_k)
    extra = {layer: {CONTRIBUTIONS[part]: total / count if count else None
                     for part in parts[1:] for total, count in [norms[part, layer]]}
             for layer in layers}
    path = calibration_path(experiment, variant_name)
    write_json(path, {
        "variant": variant_name, "prompt_set": prompt_set, "top_k": top_k,
        "model": loaded.provenance.get("model"),
        "layers": {str(layer): {"dims": r.dims, "values": r.values, "ratio": r.ratio,
                                "mean_norm": r.mean_norm, **extra[layer],
                                "n_tokens": r.count, "mean": [float(x) for x in r.mean]}
                   for layer, r in result.items()},
    })
    return path
