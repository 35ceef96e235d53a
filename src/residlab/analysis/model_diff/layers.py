"""Layer sensitivity: the per-token deltas of one trait at several layers, and how they agree.

``model_diff/{A}_vs_{B}/layer_sensitivity/{trait}/{prompt_set}.json`` holds, per prompt, one
row of deltas per layer and their cross-layer Pearson correlations (the dashboard's layers
mode), and across prompts the mean of those matrices and the correlation of all tokens pooled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from residlab.analysis.model_diff import diff_dir
from residlab.analysis.model_diff.per_token import (
    PromptDelta,
    _check_variants,
    _experiment,
    _traits,
    id_sort_key,
    load_deltas,
)
from residlab.errors import UsageError
from residlab.experiments import Experiment
from residlab.store import write_json

__all__ = ["layer_sensitivity"]


def _correlations(rows: np.ndarray) -> np.ndarray:
    """Pearson correlation between rows ``(L, n)`` -> ``(L, L)``; NaN where a row is constant
    (or ``n < 2``)."""
    centered = rows - rows.mean(axis=1, keepdims=True)  # (L, n)
    norms = np.sqrt((centered**2).sum(axis=1))  # (L,)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (centered @ centered.T) / np.outer(norms, norms)  # (L, L)
    return np.where(np.outer(norms, norms) > 0, np.clip(corr, -1.0, 1.0), np.nan)


def _nan_mean(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """Entry-wise mean over the finite values (NaN where there is none)."""
    stack = np.stack(matrices)  # (P, L, L)
    valid = np.isfinite(stack)
    sums = np.where(valid, stack, 0.0).sum(axis=0)
    counts = valid.sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _finite(values: np.ndarray) -> list:
    """Nested lists with ``None`` for NaN (valid JSON)."""
    return [_finite(row) for row in values] if values.ndim > 1 else [
        float(v) if math.isfinite(v) else None for v in values]


def _sensitivity_prompt(rows: list[PromptDelta]) -> tuple[dict[str, Any], np.ndarray]:
    """One prompt's deltas at each layer (one row per layer) and their correlations."""
    first = rows[0]
    if len({row.delta.size for row in rows}) > 1:
        raise UsageError(f"prompt {first.prompt_id}: the projections of its layers cover "
                         "different numbers of tokens; project all layers again")
    matrix = np.stack([row.delta for row in rows])  # (L, n)
    corr = _correlations(matrix)
    return {"prompt_id": first.prompt_id, "prompt_text": first.prompt_text,
            "response_text": first.response_text, "tokens": first.tokens,
            "deltas": matrix.tolist(), "mean_delta": matrix.mean(axis=1).tolist(),
            "correlation": _finite(corr)}, corr


def layer_sensitivity(experiment: Experiment | str, variant_a: str, variant_b: str,
                      prompt_set: str, *, trait: str, layers: Sequence[int],
                      variant_a_prompt_set: str | None = None) -> Path:
    """Per prompt, the per-token deltas at each layer and their cross-layer Pearson
    correlations; across prompts, the mean of those matrices and the correlation of all tokens
    pooled. Writes ``layer_sensitivity/{trait}/{prompt_set}.json`` for the dashboard."""
    experiment = _experiment(experiment)
    _check_variants(experiment, variant_a, variant_b)
    layers = list(dict.fromkeys(layers))
    if not layers or trait in (None, "all"):
        raise UsageError("layer sensitivity needs one trait and at least one layer "
                         "(e.g. --trait T --layers 10,15,20)")
    sets = (variant_a_prompt_set or prompt_set, prompt_set)
    _traits(experiment, variant_a, variant_b, sets, trait)
    loaded = [load_deltas(experiment, variant_a, variant_b, prompt_set, trait=trait, layer=layer,
                          variant_a_prompt_set=variant_a_prompt_set) for layer in layers]
    by_id = [{item.prompt_id: item for item in deltas.items} for deltas in loaded]
    common = sorted(set.intersection(*(set(found) for found in by_id)), key=id_sort_key)
    if not common:
        raise UsageError(f"no prompt of {prompt_set} is projected at every layer {layers}")
    prompts, matrices = zip(*(_sensitivity_prompt([found[pid] for found in by_id])
                              for pid in common), strict=True)
    pooled = np.concatenate([np.asarray(p["deltas"]) for p in prompts], axis=1)  # (L, N)
    record = {"experiment": experiment.name, "variant_a": variant_a, "variant_b": variant_b,
              "prompt_set": prompt_set, "variant_a_prompt_set": sets[0], "trait": trait,
              "layers": layers, "vector_layers": [deltas.layer for deltas in loaded],
              "n_prompts": len(prompts), "per_layer_mean_delta": pooled.mean(axis=1).tolist(),
              "mean_correlation": _finite(_nan_mean(matrices)),
              "pooled_correlation": _finite(_correlations(pooled)), "prompts": list(prompts)}
    path = diff_dir(experiment, variant_a, variant_b) / "layer_sensitivity" / trait / (
        f"{prompt_set}.json")
    write_json(path, record, compact=True)
    return path
