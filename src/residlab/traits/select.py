"""Choose which stored vector to use: ``best``, ``best+K``, a layer, or a list of layers.

With steering results, ``best`` is the vector whose steering raised the trait most over the
baseline among settings whose coherence stayed at or above ``min_coherence`` (a negative
coefficient that lowers the trait counts as a gain too: direction-aware); only results of
vectors with the same method, layer, position, component and variant count. Without them it is
the vector with the highest held-out effect size.

Layers are normalised with the model's layer count (``-1`` is the last layer; out of range is
an error), then snapped to the nearest layer that has a vector (and, for projection, that was
captured). A snap is logged as a warning and kept in :attr:`Choice.requested_layer`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from residlab.arch import normalize_layer
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.traits.positions import position_slug
from residlab.traits.steer_results import load_results, summarize
from residlab.traits.vectors import StoredVector, TraitVector, find_vectors, load_vector

__all__ = ["Choice", "parse_layer_request", "select_vectors"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    vector: TraitVector
    path: Path
    reason: str
    requested_layer: int | None = None  # the layer asked for, after normalisation


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


def _explicit(layer: int, n_layers: int | None) -> int:
    """A requested layer index in ``[0, n_layers)``; negative ones count from the end."""
    if n_layers is not None:
        return normalize_layer(layer, n_layers)
    if layer < 0:
        raise UsageError(f"layer {layer} counts from the end, but the model's number of layers "
                         "is unknown here; give a layer >= 0")
    return layer


def _offset(best: int, offset: int, n_layers: int | None) -> int:
    """``best + offset``, which must stay inside the model (never wrapped around)."""
    target = best + offset
    top = n_layers - 1 if n_layers is not None else None
    if target < 0 or (top is not None and target > top):
        raise UsageError(f"best{offset:+d} is layer {target}, outside this model's layers "
                         f"0..{top if top is not None else 'N-1'}; use a smaller offset")
    return target


def _steering_best(experiment, trait, steer_variant, candidates: list[StoredVector],
                   component: str, variant: str, min_coherence: float):
    """The (method, position, layer) whose steering gained most, among rows of these very
    vectors (same method, layer, position, component and variant)."""
    keys = {(c.method, c.layer, position_slug(c.position)) for c in candidates}
    rows = [r for r in summarize(load_results(experiment, trait, steer_variant))
            if r["layer"] is not None and r["coherence"] >= min_coherence
            and r.get("component") == component and r.get("vector_variant") == variant
            and r.get("position") is not None
            and (r["method"], r["layer"], position_slug(r["position"])) in keys]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["gain"] * (1 if r["coefficient"] > 0 else -1))
    signed = best["gain"] * (1 if best["coefficient"] > 0 else -1)
    if signed <= 0:
        return None
    return best["method"], best["position"], best["layer"], (
        f"steering raised the trait by {best['gain']:+.1f} at coefficient "
        f"{best['coefficient']:g} with coherence {best['coherence']:.0f}")


def _no_vectors(experiment, trait, variant, method, position, component) -> NotFound:
    have = find_vectors(experiment, trait, variant, position=None, component=component,
                        method=None)
    listing = sorted({f"{c.method}@{c.position}:L{c.layer}" for c in have})
    return NotFound(
        f"no vectors for {trait} (variant {variant}, {component}"
        f"{', ' + method if method else ''}{', ' + position if position else ''}); stored: "
        f"{', '.join(listing[:10]) or 'none'}; run 'residlab extract --traits {trait}'")


def select_vectors(
    experiment: Experiment, trait: str, *, variant: str, layer: str | int | None = "best",
    method: str | None = None, position: str | None = None, component: str = "residual",
    available_layers: Sequence[int] | None = None, steer_variant: str | None = None,
    min_coherence: float = 77.0, n_layers: int | None = None,
) -> list[Choice]:
    """The vector(s) to use for ``trait`` and why.

    ``n_layers`` (the model's layer count) lets explicit layers count from the end and turns
    out-of-range requests into errors; without it negative layers are refused."""
    candidates = find_vectors(experiment, trait, variant, position=position,
                              component=component, method=method)
    if available_layers is not None:
        captured = set(available_layers)
        usable = [c for c in candidates if c.layer in captured]
        candidates = usable or candidates
    if not candidates:
        raise _no_vectors(experiment, trait, variant, method, position, component)
    request = parse_layer_request(layer)
    if isinstance(request, list):
        wanted = [_explicit(value, n_layers) for value in request]
        return [_at_layer(candidates, w, f"layer {w} requested") for w in wanted]
    _, offset = request
    picked = _steering_best(experiment, trait, steer_variant or variant, candidates, component,
                            variant, min_coherence)
    if picked is None:
        best = max(candidates, key=lambda c: (c.effect_size, -c.layer))
        meth, spot, best_layer = best.method, best.position, best.layer
        reason = f"highest held-out effect size (d={best.effect_size:.2f}) among stored vectors"
    else:
        meth, spot, best_layer, reason = picked
    same = [c for c in candidates
            if c.method == meth and position_slug(c.position) == position_slug(spot)]
    return [_at_layer(same, _offset(best_layer, offset, n_layers),
                      reason + (f", offset {offset:+d}" if offset else ""))]


def _at_layer(candidates: list[StoredVector], wanted: int, reason: str) -> Choice:
    layer = _nearest(wanted, sorted({c.layer for c in candidates}))
    best = max((c for c in candidates if c.layer == layer), key=lambda c: c.effect_size)
    note = ""
    if layer != wanted:
        note = f" (snapped from {wanted})"
        log.warning("no usable %s vector at layer %d; using the nearest one, at layer %d",
                    best.method, wanted, layer)
    return Choice(load_vector(best.path), best.path,
                  f"{best.method} vector at layer {layer}{note}: {reason}", wanted)
