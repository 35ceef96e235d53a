"""Choose which stored vector to use: ``best``, ``best+K``, a layer, or a list of layers.

With steering results, ``best`` is the vector whose steering raised the trait most over the
baseline among settings whose coherence stayed at or above ``min_coherence`` (a negative
coefficient that lowers the trait counts as a gain too: direction-aware). Without them it is
the vector with the highest held-out effect size. The layer is then snapped to the nearest
layer that has a vector (and, for projection, that was captured).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.traits.steer import load_results, summarize
from residlab.traits.vectors import TraitVector, find_vectors, load_vector

__all__ = ["Choice", "parse_layer_request", "select_vectors"]


@dataclass(frozen=True)
class Choice:
    vector: TraitVector
    path: Path
    reason: str


def parse_layer_request(spec: str | int | None) -> tuple[str, int] | list[int]:
    """``("best", offset)`` or an explicit list of layers."""
    text = "best" if spec in (None, "", "auto") else str(spec).replace(" ", "")
    match = re.fullmatch(r"best([+-]\d+)?", text)
    if match:
        return "best", int(match.group(1) or 0)
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(
            f"layer {spec!r} not understood; use best, best+5, 16 or 12,16,20") from None


def _nearest(target: int, layers: Sequence[int]) -> int:
    return min(layers, key=lambda layer: (abs(layer - target), layer))


def _steering_best(experiment, trait, steer_variant, candidates, min_coherence):
    rows = [r for r in summarize(load_results(experiment, trait, steer_variant))
            if r["layer"] is not None and r["coherence"] >= min_coherence]
    keys = {(c.method, c.layer) for c in candidates}
    rows = [r for r in rows if (r["method"], r["layer"]) in keys]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["gain"] * (1 if r["coefficient"] > 0 else -1))
    signed = best["gain"] * (1 if best["coefficient"] > 0 else -1)
    if signed <= 0:
        return None
    return best["method"], best["layer"], (
        f"steering raised the trait by {best['gain']:+.1f} at coefficient "
        f"{best['coefficient']:g} with coherence {best['coherence']:.0f}")


def select_vectors(
    experiment: Experiment, trait: str, *, variant: str, layer: str | int | None = "best",
    method: str | None = None, position: str | None = None, component: str = "residual",
    available_layers: Sequence[int] | None = None, steer_variant: str | None = None,
    min_coherence: float = 77.0,
) -> list[Choice]:
    """The vector(s) to use for ``trait`` and why."""
    candidates = find_vectors(experiment, trait, variant, position=position,
                              component=component, method=method)
    if available_layers is not None:
        captured = set(available_layers)
        usable = [c for c in candidates if c.layer in captured]
        candidates = usable or candidates
    if not candidates:
        have = find_vectors(experiment, trait, variant, position=None, component=component,
                            method=None)
        listing = sorted({f"{c.method}@{c.position}:L{c.layer}" for c in have})
        raise NotFound(
            f"no vectors for {trait} (variant {variant}, {component}"
            f"{', ' + method if method else ''}{', ' + position if position else ''}); stored: "
            f"{', '.join(listing[:10]) or 'none'}; run 'residlab extract --traits {trait}'")
    request = parse_layer_request(layer)
    if isinstance(request, list):
        return [_at_layer(candidates, wanted, f"layer {wanted} requested") for wanted in request]
    _, offset = request
    picked = _steering_best(experiment, trait, steer_variant or variant, candidates,
                            min_coherence)
    if picked is None:
        best = max(candidates, key=lambda c: (c.effect_size, -c.layer))
        meth, best_layer = best.method, best.layer
        reason = f"highest held-out effect size (d={best.effect_size:.2f}) among stored vectors"
    else:
        meth, best_layer, reason = picked
    same = [c for c in candidates if c.method == meth]
    return [_at_layer(same, best_layer + offset,
                      reason + (f", offset {offset:+d}" if offset else ""))]


def _at_layer(candidates, wanted: int, reason: str) -> Choice:
    layer = _nearest(wanted, sorted({c.layer for c in candidates}))
    best = max((c for c in candidates if c.layer == layer), key=lambda c: c.effect_size)
    note = "" if layer == wanted else f" (snapped from {wanted})"
    return Choice(load_vector(best.path), best.path,
                  f"{best.method} vector at layer {layer}{note}: {reason}")
