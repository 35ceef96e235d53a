"""Top Spans of a model diff (the Inference view's diff mode): the clauses or windows of
B - A projection deltas across a prompt set, z-scored against all its tokens and ranked. The
table of one pair is computed once per change of its files. Export keys: :mod:`.keys`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from residlab.analysis.model_diff.per_token import id_sort_key
from residlab.analysis.model_diff.spans import rank_spans, span_ranges, span_summary
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.server.dashboard import projections as pj
from residlab.server.dashboard.files import (
    SPAN_MODES,
    SPAN_TOP,
    DashboardFiles,
    Params,
    Where,
    cmd,
)

__all__ = ["HANDLERS", "span_table", "spans"]


@dataclass(frozen=True)
class _Delta:
    """One prompt's response tokens, B - A per token, and where the response starts."""

    prompt_id: str
    tokens: list[str]
    delta: np.ndarray  # (n,) float64
    prompt_end: int


def _pair_folders(data: DashboardFiles, exp: Experiment, a: str, b: str, prompt_set: str,
                  trait: str, layer: int | None) -> tuple[Path, Path, int]:
    """The two variants' projection folders of ``trait`` at ``layer`` (None: the default)."""
    sides = []
    for variant in (a, b):
        folders, default = pj.layer_folders(data, exp, variant, trait, prompt_set)
        chosen = default if layer is None else layer
        if chosen not in folders:
            where = "" if layer is None else f" at layer {layer}"
            command = cmd("project", exp.name, prompt_set=prompt_set, model_variant=variant,
                          traits=trait) + ("" if layer is None else f" --layer {layer}")
            raise NotFound(f"no projections of {trait}{where} for {variant} on {prompt_set}; "
                           f"run '{command}'")
        sides.append((folders[chosen], chosen))
    if sides[0][1] != sides[1][1]:
        raise UsageError(f"{trait}: {a} is projected at layer {sides[0][1]} and {b} at "
                         f"{sides[1][1]} by default; pass layer")
    return sides[0][0], sides[1][0], sides[1][1]


def _tokens(data: DashboardFiles, wheres: tuple[Where, Where], prompt_id: str,
            n: int) -> tuple[list[str], int] | None:
    """The response tokens (B's response, else A's) matching ``n`` projected tokens."""
    for where in reversed(wheres):
        record = data.record(where, prompt_id, required=False)
        if record is not None and len(record["tokens"]) - record["prompt_end"] == n:
            return record["tokens"][record["prompt_end"]:], record["prompt_end"]
    return None


def _delta(data: DashboardFiles, wheres: tuple[Where, Where], files: tuple[Path, Path],
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


def _deltas(data: DashboardFiles, wheres: tuple[Where, Where], folders: tuple[Path, Path],
            trait: str) -> list[_Delta]:
    """Every prompt projected for both variants, B - A, natural id order."""
    ids = sorted(set(data.ids(folders[0])) & set(data.ids(folders[1])), key=id_sort_key)
    if not ids:
        raise NotFound(f"{folders[0]} and {folders[1]} share no prompt id; project both "
                       "variants on the same prompt set")
    items = [_delta(data, wheres, tuple(data.child(f, f"{i}.json", is_dir=False)
                                        for f in folders), i, trait) for i in ids]
    return [item for item in items if item.tokens]


def _signature(data: DashboardFiles, folders: tuple[Path, Path]) -> tuple:
    """What the cached spans depend on: the two folders' files and their stats."""
    out = []
    for folder in folders:
        for name in sorted(data.listing(folder)):
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
        for start, end in span_ranges(item.delta.size, item.tokens, mode, window):
            span = span_summary(item, start, end, 0)  # type: ignore[arg-type]
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


def span_table(data: DashboardFiles, p: Params) -> tuple[dict[str, list[dict]], str, int]:
    exp = data.experiment(p.text("exp"))
    a, b = data.variant(exp, p.text("a")), data.variant(exp, p.text("b"))
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


def spans(data: DashboardFiles, p: Params) -> dict[str, Any]:
    """The ``top`` spans of B - A (the whole set, or one prompt with ``scope=prompt``)."""
    scope = p.choice("scope", ("set", "prompt"), "set")
    top = p.integer("top", SPAN_TOP, 1, 1000)
    table, trait, layer = span_table(data, p)
    if scope == "prompt":
        prompt_id = p.text("id")
        if prompt_id not in table:
            raise NotFound(f"prompt {prompt_id!r} has no projections of both variants with "
                           "response tokens")
        chosen = table[prompt_id]
    else:
        chosen = [span for found in table.values() for span in found]
    return {"trait": trait, "layer": layer,
            "spans": [_span_out(s) for s in rank_spans(chosen, "abs", top)]}


HANDLERS = {"spans": spans}
