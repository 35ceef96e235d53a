"""The Layer Deep Dive's answers: the logit lens and the attention of one token, from
``extract-viz`` files, else computed with the model the server holds (kept for the last few
prompts). Its export keys are in :mod:`residlab.server.dashboard.keys`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from residlab.errors import NotFound, UsageError
from residlab.server.dashboard.files import (
    ATTENTION_LIMIT,
    LENS_TOP_K,
    DashboardFiles,
    Invalid,
    ModelUnavailable,
    Params,
    Where,
    b64,
    cmd,
)

__all__ = ["HANDLERS", "attention", "file_rows", "lens", "parse_lens", "viz_file"]

COMPUTED = 4  # prompts whose computed lens / attention the server keeps
_computed_lock = threading.Lock()


# --- on demand -----------------------------------------------------------------------------------

def _model_for(data: DashboardFiles, where: Where, what: str, command: str):
    """The model that may compute ``what`` for ``where`` on demand, else the error to give."""
    state = data.state
    loaded = None if state is None else state.loaded
    if state is not None and loaded is None:
        raise ModelUnavailable(f"no model loaded: the {what} is not in a file; make it with "
                               f"'{command}' or serve --experiment {where.exp.name} "
                               f"--model-variant {where.variant}")
    exp = None if state is None else state.experiment
    if loaded is None or exp is None or exp.name != where.exp.name or (
            state.variant != where.variant):
        raise NotFound(f"no {what} file for this prompt; make it with '{command}'")
    return loaded


def _computed(state, kind: str, key: tuple, compute):
    """``compute()``'s result, kept per prompt in ``state.cache`` (the last few)."""
    with _computed_lock:
        cache = state.cache.setdefault(f"dashboard_{kind}", OrderedDict())
        found = cache.get(key)
        if found is not None:
            cache.move_to_end(key)
            return found
    with state.model_lock:
        value = compute()
    with _computed_lock:
        cache[key] = value
        while len(cache) > COMPUTED:
            cache.popitem(last=False)
    return value


def viz_file(data: DashboardFiles, where: Where, name: str) -> Path | None:
    return data.child(data.root, where.exp.name, "analysis", "per_token", where.variant,
                      where.prompt_set, name, is_dir=False)


def _viz_command(where: Where, kind: str) -> str:
    return cmd("extract-viz", where.exp.name, prompt_set=where.prompt_set,
               model_variant=where.variant) + f" --{kind}"


# --- lens ----------------------------------------------------------------------------------------

def parse_lens(path: Path, data: bytes) -> dict[str, Any]:
    import orjson

    doc = orjson.loads(data)
    if not isinstance(doc, dict):
        raise Invalid("not a JSON object")
    tokens, layers, predictions = doc.get("tokens"), doc.get("layers"), doc.get("predictions")
    if not isinstance(tokens, list) or not isinstance(layers, list) or not isinstance(
            predictions, list):
        raise Invalid("needs 'tokens', 'layers' and 'predictions' lists")
    if len(predictions) != max(len(tokens) - 1, 0):
        raise Invalid(f"{len(predictions)} predictions for {len(tokens)} tokens")
    for i, entry in enumerate(predictions):
        if not isinstance(entry, dict) or entry.get("token_idx") != i or not isinstance(
                entry.get("by_layer"), list):
            raise Invalid(f"prediction {i} is not the one of token {i}")
    return doc


def _computed_lens(data: DashboardFiles, where: Where, prompt_id: str) -> dict[str, Any]:
    from residlab.arch import resolve_arch
    from residlab.inference import logit_lens
    from residlab.inference.extract_viz import TokenText, lens_document
    from residlab.inference.raw import token_hash

    command = _viz_command(where, "logit-lens")
    loaded = _model_for(data, where, "logit lens", command)
    record = data.record(where, prompt_id)
    ids = record["token_ids"]
    state = data.state

    def compute() -> dict[str, Any]:
        readout = logit_lens(loaded, ids, top_k=LENS_TOP_K)
        return lens_document({**record, "id": prompt_id}, readout,
                             TokenText(loaded.tokenizer), prompt_set=where.prompt_set,
                             n_layers=resolve_arch(loaded.model).n_layers, top_k=LENS_TOP_K,
                             settings={"kind": "logit_lens", "computed": True})

    key = (state.generation, where.exp.name, where.variant, where.prompt_set, prompt_id,
           token_hash(ids))
    return _computed(state, "lens", key, compute)


def _check_tokens(data: DashboardFiles, where: Where, prompt_id: str, path: Path,
                  ids: Any, kind: str) -> None:
    """A lens / attention file made from other token ids than the response shown now (the
    responses were made again since) is not shown: NotFound naming the command."""
    record = data.record(where, prompt_id, required=False)
    if record is not None and ids is not None and list(ids) != record["token_ids"]:
        raise NotFound(f"{path} was made from other tokens than the response of {prompt_id} "
                       f"(the responses were made again); make it again with "
                       f"'{_viz_command(where, kind)}'")


def lens(data: DashboardFiles, p: Params) -> dict[str, Any]:
    """The logit lens at one token: top-k per layer and the actual next token's rank."""
    where = data.where(p)
    prompt_id = p.text("id")
    token = p.integer("token", None, 0)
    path = viz_file(data, where, f"{prompt_id}_logit_lens.json")
    if path is not None:
        try:
            doc, source = data.load(path, parse_lens), "file"
        except Invalid as error:
            raise UsageError(f"{path} is not a valid logit lens file ({error}); make it again "
                             f"with '{_viz_command(where, 'logit-lens')}'") from None
        _check_tokens(data, where, prompt_id, path, doc.get("token_ids"), "logit-lens")
    else:
        doc, source = _computed_lens(data, where, prompt_id), "computed"
    predictions = doc["predictions"]
    if token >= len(predictions):
        raise UsageError(f"token={token} is out of range: the lens covers tokens 0 to "
                         f"{len(predictions) - 1} (the last token has no next one)")
    entry = predictions[token]
    return {"source": source, "token_idx": token, "token": doc["tokens"][token],
            "actual_next_token": entry.get("actual_next_token"), "layers": doc["layers"],
            "by_layer": entry["by_layer"]}


# --- attention -----------------------------------------------------------------------------------

def file_rows(path: Path, where: Where, token: int) -> tuple[np.ndarray, list[int]]:
    """``(rows (L, H, token+1) float32, layers, token ids or None)`` of query ``token`` from an
    attention file."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            layers = json.loads((handle.metadata() or {})["layers"])
            part = handle.get_slice("attention")
            shape = part.get_shape()
            if len(shape) != 4 or shape[2] != shape[3] or len(layers) != shape[0]:
                raise ValueError(f"attention of shape {shape} for layers {layers}")
            if token >= shape[2]:
                raise UsageError(f"token={token} is out of range: this prompt has tokens 0 to "
                                 f"{shape[2] - 1}")
            ids = json.loads(handle.metadata().get("token_ids", "null"))
            rows = part[:, :, token:token + 1, :token + 1]  # (L, H, 1, token+1)
    except UsageError:
        raise
    except Exception as error:  # a corrupt or foreign file
        raise UsageError(f"{path} is not a valid attention file ({error}); make it again with "
                         f"'{_viz_command(where, 'attention')}'") from None
    return np.asarray(rows, dtype=np.float32)[:, :, 0, :], [int(x) for x in layers], ids


def _computed_weights(data: DashboardFiles, where: Where, prompt_id: str) -> np.ndarray:
    """``(n_layers, H, T, T)`` float16 of every layer, computed with the server's model."""
    from residlab.arch import resolve_arch
    from residlab.inference import attention_patterns
    from residlab.inference.attention import n_attention_heads
    from residlab.inference.raw import token_hash

    command = _viz_command(where, "attention")
    loaded = _model_for(data, where, "attention", command)
    record = data.record(where, prompt_id)
    ids = record["token_ids"]
    arch = resolve_arch(loaded.model)
    size = arch.n_layers * n_attention_heads(arch, loaded.model) * len(ids) ** 2 * 2
    if size > ATTENTION_LIMIT:
        raise UsageError(f"the attention of all {arch.n_layers} layers over {len(ids)} tokens "
                         f"would take {size / 2**20:.0f} MiB (over "
                         f"{ATTENTION_LIMIT // 2**20} MiB); write it for a few layers with "
                         f"'{command} --layers 0,{arch.n_layers // 2},-1'")

    def compute() -> np.ndarray:
        import torch

        return attention_patterns(loaded, ids).to(torch.float16).numpy()  # (L, H, T, T)

    key = (data.state.generation, where.exp.name, where.variant, where.prompt_set, prompt_id,
           token_hash(ids))
    return _computed(data.state, "attention", key, compute)


def attention(data: DashboardFiles, p: Params) -> dict[str, Any]:
    """Query ``token``'s attention: head-averaged at every layer, per head at ``layer``."""
    where = data.where(p)
    prompt_id = p.text("id")
    token = p.integer("token", None, 0)
    layer = p.integer("layer") if p.params.get("layer") else None
    path = viz_file(data, where, f"{prompt_id}_attention.safetensors")
    if path is not None:
        if not path.resolve().is_relative_to(data.top):
            raise NotFound(f"{path} is outside {data.root}")
        rows, layers, ids = file_rows(path, where, token)
        _check_tokens(data, where, prompt_id, path, ids, "attention")
        source = "file"
    else:
        weights = _computed_weights(data, where, prompt_id)
        if token >= weights.shape[2]:
            raise UsageError(f"token={token} is out of range: this prompt has tokens 0 to "
                             f"{weights.shape[2] - 1}")
        rows = weights[:, :, token, :token + 1].astype(np.float32)  # (L, H, token+1)
        layers, source = list(range(weights.shape[0])), "computed"
    layer = layers[0] if layer is None else layer
    if layer not in layers:
        raise NotFound(f"layer {layer} is not stored for this prompt (layers: "
                       f"{', '.join(map(str, layers))})")
    return {"source": source, "token_idx": token, "layers": layers, "n_heads": rows.shape[1],
            "context": token + 1, "mean_b64": b64(rows.mean(axis=1)),  # (L, token+1)
            "layer": layer, "heads_b64": b64(rows[layers.index(layer)])}  # (H, token+1)


HANDLERS = {"lens": lens, "attention": attention}
