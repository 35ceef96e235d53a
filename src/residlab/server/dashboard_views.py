"""The dashboard's answers computed from several files or on demand: Top Spans of a model
diff, and the logit lens and attention of one token (from ``extract-viz`` files, else computed
with the model the server holds). The file lookups and parsing live in
:mod:`residlab.server.dashboard_data`; the export keys of these views in
:mod:`residlab.server.dashboard_keys`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from residlab.analysis.model_diff.per_token import _id_key
from residlab.analysis.model_diff.spans import _ranges, _rank, _span
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.server import dashboard_projections as pj
from residlab.server.dashboard_data import (
    ATTENTION_LIMIT,
    LENS_TOP_K,
    SPAN_MODES,
    SPAN_TOP,
    ModelUnavailable,
    _b64,
    _cmd,
    _Invalid,
    _Params,
    _Where,
)

if TYPE_CHECKING:
    from residlab.server.dashboard_data import DashboardData

__all__ = ["HANDLERS", "attention", "lens", "spans"]

COMPUTED = 4  # prompts whose computed lens / attention the server keeps
_computed_lock = threading.Lock()


# --- spans ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Delta:
    """One prompt's response tokens, B - A per token, and where the response starts."""

    prompt_id: str
    tokens: list[str]
    delta: np.ndarray  # (n,) float64
    prompt_end: int


def _pair_folders(data: DashboardData, exp: Experiment, a: str, b: str, prompt_set: str,
                  trait: str, layer: int | None) -> tuple[Path, Path, int]:
    """The two variants' projection folders of ``trait`` at ``layer`` (None: the default)."""
    sides = []
    for variant in (a, b):
        folders, default = pj.layer_folders(data, exp, variant, trait, prompt_set)
        chosen = default if layer is None else layer
        if chosen not in folders:
            where = "" if layer is None else f" at layer {layer}"
            command = _cmd("project", exp.name, prompt_set=prompt_set, model_variant=variant,
                           traits=trait) + ("" if layer is None else f" --layer {layer}")
            raise NotFound(f"no projections of {trait}{where} for {variant} on {prompt_set}; "
                           f"run '{command}'")
        sides.append((folders[chosen], chosen))
    if sides[0][1] != sides[1][1]:
        raise UsageError(f"{trait}: {a} is projected at layer {sides[0][1]} and {b} at "
                         f"{sides[1][1]} by default; pass layer")
    return sides[0][0], sides[1][0], sides[1][1]


def _tokens(data: DashboardData, wheres: tuple[_Where, _Where], prompt_id: str,
            n: int) -> tuple[list[str], int] | None:
    """The response tokens (B's response, else A's) matching ``n`` projected tokens."""
    for where in reversed(wheres):
        record = data._record(where, prompt_id, required=False)
        if record is not None and len(record["tokens"]) - record["prompt_end"] == n:
            return record["tokens"][record["prompt_end"]:], record["prompt_end"]
    return None


def _delta(data: DashboardData, wheres: tuple[_Where, _Where], files: tuple[Path, Path],
           prompt_id: str, trait: str) -> _Delta:
    (where_a, where_b), read = wheres, []
    for where, path in zip(wheres, files, strict=True):
        read.append(pj.read_projection(data, path, where.exp, where.variant, where.prompt_set))
    file_a, file_b = read
    if file_a.sha256 != file_b.sha256:
        raise UsageError(f"prompt {prompt_id}: the two variants' {trait} projections use "
                         "different vectors; project both with the same layer, method, position "
                         "and extraction variant")
    if file_a.n_response != file_b.n_response:
        raise UsageError(f"prompt {prompt_id}: {where_a.variant} has {file_a.n_response} "
                         f"response tokens and {where_b.variant} {file_b.n_response}; capture "
                         f"{where_a.variant} with --responses-from {where_b.variant} and "
                         "project again")
    n = file_b.n_response
    found = _tokens(data, wheres, prompt_id, n)
    if found is None:
        raise UsageError(f"prompt {prompt_id}: no response of {where_b.variant} or "
                         f"{where_a.variant} has the {n} tokens projected; project again")
    delta = file_b.proj[file_b.proj.size - n:] - file_a.proj[file_a.proj.size - n:]  # (n,)
    return _Delta(prompt_id, list(found[0]), delta, found[1])


def _deltas(data: DashboardData, wheres: tuple[_Where, _Where], folders: tuple[Path, Path],
            trait: str) -> list[_Delta]:
    """Every prompt projected for both variants, B - A, natural id order."""
    ids = sorted(set(data._ids(folders[0])) & set(data._ids(folders[1])), key=_id_key)
    if not ids:
        raise NotFound(f"{folders[0]} and {folders[1]} share no prompt id; project both "
                       "variants on the same prompt set")
    items = [_delta(data, wheres, tuple(data._child(f, f"{i}.json", is_dir=False)
                                        for f in folders), i, trait) for i in ids]
    return [item for item in items if item.tokens]


def _signature(data: DashboardData, folders: tuple[Path, Path]) -> tuple:
    """What the cached spans depend on: the two folders' files and their stats."""
    out = []
    for folder in folders:
        for name in sorted(data._listing(folder)):
            stat = (folder / name).stat()
            out.append((str(folder / name), stat.st_mtime_ns, stat.st_size))
    return tuple(out)


def _all_spans(items: list[_Delta], mode: str, window: int) -> dict[str, list[dict]]:
    """Every span of the set by prompt id (``z`` against all the set's tokens)."""
    if not items:
        return {}
    values = np.concatenate([item.delta for item in items])  # (N,)
    mean, std = float(values.mean()), float(values.std())
    out: dict[str, list[dict]] = {}
    for item in items:
        found = out.setdefault(item.prompt_id, [])
        for start, end in _ranges(item.delta.size, item.tokens, mode, window):
            span = _span(item, start, end, 0)  # type: ignore[arg-type]
            span["z"] = (span["mean_delta"] - mean) / std if std > 0 else 0.0
            span["prompt_end"] = item.prompt_end
            found.append(span)
    return out


def _span_out(span: dict) -> dict[str, Any]:
    start, end = span["token_range"]
    return {"prompt_id": span["prompt_id"], "start": span["prompt_end"] + start,
            "end": span["prompt_end"] + end, "text": span["text"],
            "mean_delta": span["mean_delta"], "max_delta": span["max_delta"],
            "n_tokens": span["n_tokens"], "z": span["z"]}


def _span_table(data: DashboardData, p: _Params) -> tuple[dict[str, list[dict]], str, int]:
    exp = data._exp(p.text("exp"))
    a, b = data._variant(exp, p.text("a")), data._variant(exp, p.text("b"))
    if a == b:
        raise UsageError(f"a={a} and b={b}: pick two different variants")
    prompt_set, trait = p.text("set"), p.text("trait")
    layer = p.integer("layer") if p.params.get("layer") else None
    mode = p.choice("mode", SPAN_MODES, "clause")
    window = p.integer("window", 8, 1, 4096)
    wheres = (data.locate(exp, a, prompt_set), data.locate(exp, b, prompt_set))
    folder_a, folder_b, layer = _pair_folders(data, exp, a, b, prompt_set, trait, layer)
    signature = _signature(data, (folder_a, folder_b))
    key = (signature, mode, window if mode == "window" else 0)
    table = data.spans_cache.get(key)
    if table is None:
        table = _all_spans(_deltas(data, wheres, (folder_a, folder_b), trait), mode, window)
        data.spans_cache.put(key, table, 1)
    return table, trait, layer


def spans(data: DashboardData, p: _Params) -> dict[str, Any]:
    """The ``top`` spans of B - A (the whole set, or one prompt with ``scope=prompt``)."""
    scope = p.choice("scope", ("set", "prompt"), "set")
    top = p.integer("top", SPAN_TOP, 1, 1000)
    table, trait, layer = _span_table(data, p)
    if scope == "prompt":
        prompt_id = p.text("id")
        if prompt_id not in table:
            raise NotFound(f"prompt {prompt_id!r} has no projections of both variants with "
                           "response tokens")
        chosen = table[prompt_id]
    else:
        chosen = [span for found in table.values() for span in found]
    return {"trait": trait, "layer": layer,
            "spans": [_span_out(s) for s in _rank(chosen, "abs", top)]}


# --- on demand -----------------------------------------------------------------------------------

def _model_for(data: DashboardData, where: _Where, what: str, command: str):
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


def _viz_file(data: DashboardData, where: _Where, name: str) -> Path | None:
    return data._child(data.root, where.exp.name, "analysis", "per_token", where.variant,
                       where.prompt_set, name, is_dir=False)


def _viz_command(where: _Where, kind: str) -> str:
    return _cmd("extract-viz", where.exp.name, prompt_set=where.prompt_set,
                model_variant=where.variant) + f" --{kind}"


# --- lens ----------------------------------------------------------------------------------------

def _parse_lens(path: Path, data: bytes) -> dict[str, Any]:
    import orjson

    doc = orjson.loads(data)
    if not isinstance(doc, dict):
        raise _Invalid("not a JSON object")
    tokens, layers, predictions = doc.get("tokens"), doc.get("layers"), doc.get("predictions")
    if not isinstance(tokens, list) or not isinstance(layers, list) or not isinstance(
            predictions, list):
        raise _Invalid("needs 'tokens', 'layers' and 'predictions' lists")
    if len(predictions) != max(len(tokens) - 1, 0):
        raise _Invalid(f"{len(predictions)} predictions for {len(tokens)} tokens")
    for i, entry in enumerate(predictions):
        if not isinstance(entry, dict) or entry.get("token_idx") != i or not isinstance(
                entry.get("by_layer"), list):
            raise _Invalid(f"prediction {i} is not the one of token {i}")
    return doc


def _computed_lens(data: DashboardData, where: _Where, prompt_id: str) -> dict[str, Any]:
    from residlab.arch import resolve_arch
    from residlab.inference import logit_lens
    from residlab.inference.extract_viz import TokenText, lens_document
    from residlab.inference.raw import token_hash

    command = _viz_command(where, "logit-lens")
    loaded = _model_for(data, where, "logit lens", command)
    record = data._record(where, prompt_id)
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


def lens(data: DashboardData, p: _Params) -> dict[str, Any]:
    """The logit lens at one token: top-k per layer and the actual next token's rank."""
    where = data._where(p)
    prompt_id = p.text("id")
    token = p.integer("token", None, 0)
    path = _viz_file(data, where, f"{prompt_id}_logit_lens.json")
    if path is not None:
        try:
            doc, source = data._load(path, _parse_lens), "file"
        except _Invalid as error:
            raise UsageError(f"{path} is not a valid logit lens file ({error}); make it again "
                             f"with '{_viz_command(where, 'logit-lens')}'") from None
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

def _file_rows(path: Path, where: _Where, token: int) -> tuple[np.ndarray, list[int]]:
    """``(rows (L, H, token+1) float32, layers)`` of query ``token`` from an attention file."""
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
            rows = part[:, :, token:token + 1, :token + 1]  # (L, H, 1, token+1)
    except UsageError:
        raise
    except Exception as error:  # a corrupt or foreign file
        raise UsageError(f"{path} is not a valid attention file ({error}); make it again with "
                         f"'{_viz_command(where, 'attention')}'") from None
    return np.asarray(rows, dtype=np.float32)[:, :, 0, :], [int(x) for x in layers]


def _computed_weights(data: DashboardData, where: _Where, prompt_id: str) -> np.ndarray:
    """``(n_layers, H, T, T)`` float16 of every layer, computed with the server's model."""
    from residlab.arch import resolve_arch
    from residlab.inference import attention_patterns
    from residlab.inference.attention import _heads
    from residlab.inference.raw import token_hash

    command = _viz_command(where, "attention")
    loaded = _model_for(data, where, "attention", command)
    record = data._record(where, prompt_id)
    ids = record["token_ids"]
    arch = resolve_arch(loaded.model)
    size = arch.n_layers * _heads(arch, loaded.model) * len(ids) ** 2 * 2
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


def attention(data: DashboardData, p: _Params) -> dict[str, Any]:
    """Query ``token``'s attention: head-averaged at every layer, per head at ``layer``."""
    where = data._where(p)
    prompt_id = p.text("id")
    token = p.integer("token", None, 0)
    layer = p.integer("layer") if p.params.get("layer") else None
    path = _viz_file(data, where, f"{prompt_id}_attention.safetensors")
    if path is not None:
        if not path.resolve().is_relative_to(data.top):
            raise NotFound(f"{path} is outside {data.root}")
        rows, layers = _file_rows(path, where, token)
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
            "context": token + 1, "mean_b64": _b64(rows.mean(axis=1)),  # (L, token+1)
            "layer": layer, "heads_b64": _b64(rows[layers.index(layer)])}  # (H, token+1)


HANDLERS = {"spans": spans, "lens": lens, "attention": attention}
