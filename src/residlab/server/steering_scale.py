"""The typical residual norm of each layer: the unit live steering coefficients count in.

A unit trait vector added with coefficient 1 is tiny next to a residual stream whose tokens have
norms in the tens or hundreds, so Live Chat multiplies each coefficient by the layer's typical
token norm: coefficient 1 adds a vector as long as a typical token's residual. The norm comes
from the experiment's ``calibration.json`` when ``residlab calibrate`` made one (its
``median_norm`` if recorded, else ``mean_norm``: response tokens), else it is measured once on
the shipped calibration prompts (the median token norm of their templated prompt tokens, all
layers in one pass) and cached in the server state until the model changes (the cache is keyed
on ``state.generation``, which every ``/model/load`` increments, and the calibration file).
"""

from __future__ import annotations

from typing import Any

import orjson
import torch

from residlab.arch import resolve_arch
from residlab.generation import padded_inputs
from residlab.hooks import Capture, intervene
from residlab.inference.calibrate import calibration_path
from residlab.inference.prompt_sets import load_prompt_set
from residlab.prompts import template_ids
from residlab.server.state import ServerState

__all__ = ["CALIBRATION_SET", "measure_norm_scales", "norm_scales"]

CALIBRATION_SET = "calibration"
_CACHE_KEY = "norm_scales"


def norm_scales(state: ServerState) -> dict[int, float]:
    """``{layer: typical token norm}`` for the loaded model (cached per model load).

    A cached answer never waits; a measurement takes the model lock (so one runs at a time,
    and the model cannot change under it) and stores what it measured under the load it
    measured (``state.generation``), so a model swapped meanwhile is measured afresh."""
    if state.loaded is None:
        raise RuntimeError("no model is loaded")
    cached = _cached(state)
    if cached is not None:
        return cached
    key = _key(state)  # before reading: a model swapped meanwhile makes this entry stale
    scales = _from_calibration(state)
    if scales is not None:
        state.cache[_CACHE_KEY] = (key, scales)
        return scales
    with state.model_lock:
        cached = _cached(state)  # measured by another request while this one waited
        if cached is not None:
            return cached
        key, scales = _key(state), measure_norm_scales(state.loaded)
        state.cache[_CACHE_KEY] = (key, scales)
        return scales


def _key(state: ServerState) -> tuple[int, tuple[str, float] | None]:
    return state.generation, _calibration_key(state)


def _cached(state: ServerState) -> dict[int, float] | None:
    cached = state.cache.get(_CACHE_KEY)
    return cached[1] if cached is not None and cached[0] == _key(state) else None


def _calibration_key(state: ServerState) -> tuple[str, float] | None:
    """Where the calibration file is and when it changed (a new calibration is re-read)."""
    if state.experiment is None or state.variant is None:
        return None
    path = calibration_path(state.experiment, state.variant)
    return (str(path), path.stat().st_mtime) if path.is_file() else None


def _from_calibration(state: ServerState) -> dict[int, float] | None:
    if _calibration_key(state) is None:
        return None
    data: dict[str, Any] = orjson.loads(calibration_path(state.experiment, state.variant)
                                        .read_bytes())
    layers = data.get("layers") or {}
    n_layers = resolve_arch(state.loaded.model).n_layers
    scales = {int(layer): float(entry.get("median_norm", entry["mean_norm"]))
              for layer, entry in layers.items()}
    if sorted(scales) != list(range(n_layers)):
        return None  # a calibration of another model or a partial one: measure instead
    return scales


@torch.inference_mode()
def measure_norm_scales(loaded, *, prompt_set: str = CALIBRATION_SET,
                        batch_size: int = 8) -> dict[int, float]:
    """Median token norm of ``resid_post`` per layer over the prompt set's templated prompts.

    The median, not the mean: the first token of many models carries a residual tens of times
    larger than the others (an attention sink) and would dominate a mean."""
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = resolve_arch(model)
    prompts = [template_ids(tokenizer, item.messages())[1] for item in load_prompt_set(prompt_set)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    norms: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(arch.n_layers)}
    for start in range(0, len(prompts), batch_size):
        inputs = padded_inputs(prompts[start:start + batch_size], pad, device)
        captures = [Capture(layer, "resid_post") for layer in range(arch.n_layers)]
        with intervene(model, captures, arch=arch, prompt_mask=inputs["attention_mask"]):
            arch.body(**inputs, use_cache=False)
        for capture in captures:
            real = capture.selected().float()  # (n_tokens, D)
            norms[capture.layer].append(torch.linalg.vector_norm(real, dim=-1).cpu())
    return {layer: float(torch.cat(values).double().quantile(0.5))  # numpy's median
            for layer, values in norms.items()}
