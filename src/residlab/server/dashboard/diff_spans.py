"""The Model Diff spans view: the clauses of ``diff per-token`` (projection deltas) or of
``diff logprobs`` (log-prob deltas, split the same way) across a prompt set, ranked, each with
absolute token positions into the response record the Inference view's diff mode shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from residlab.analysis.model_diff.per_token import split_clauses
from residlab.analysis.model_diff.spans import rank_spans
from residlab.errors import NotFound
from residlab.experiments import Experiment
from residlab.server.dashboard.analysis import (
    diff_index,
    logprob_docs,
    read_prompt_docs,
    variant_pair,
)
from residlab.server.dashboard.files import DashboardFiles, Params, cmd

__all__ = ["HANDLERS", "export_keys"]

SORTS = ("abs", "pos", "neg")
SOURCES = ("per_token", "logprobs")
TOP = 20


def _per_token_docs(data: DashboardFiles, p: Params, exp: Experiment, a: str, b: str,
                    folder: Path | None, prompt_set: str) -> tuple[str, int, list[dict]]:
    trait, layer = p.text("trait"), p.integer("layer")
    command = cmd("diff per-token", exp.name, variant_a=a, variant_b=b,
                  prompt_set=prompt_set, trait=trait, layer=str(layer))
    where = data.child(data.trait_dir(data.child(folder, "per_token_diff"), trait),
                       f"L{layer}", prompt_set)
    ids = [i for i in data.ids(where) if i != "aggregate"]
    if not ids:
        raise NotFound(f"no per-token diff of {trait} at layer {layer} for {a} vs {b} on "
                       f"{prompt_set!r}; make it with '{command}'")
    def valid(doc: dict) -> bool:
        return isinstance(doc.get("per_token_delta"), list) and isinstance(doc.get("clauses"),
                                                                           list)

    docs = read_prompt_docs(data, where, ids, command, valid, "'per_token_delta' and 'clauses'")
    return trait, layer, [{**doc, "delta": doc["per_token_delta"]} for doc in docs]


def _clauses(doc: dict) -> list[dict]:
    """The file's clauses (per-token diffs) or the log-prob deltas split into clauses."""
    if "clauses" in doc:
        return [{**c, "prompt_id": doc["prompt_id"]} for c in doc["clauses"]]
    values = np.asarray(doc["delta"], dtype=np.float64)  # (n,)
    out = []
    for start, end in split_clauses(doc["tokens"]):
        part = values[start:end]
        out.append({"prompt_id": doc["prompt_id"], "text": "".join(doc["tokens"][start:end]),
                    "token_range": [start, end], "mean_delta": float(part.mean()),
                    "max_delta": float(part.max()), "n_tokens": end - start})
    return out


def _offsets(data: DashboardFiles, exp: Experiment, pair: tuple[str, str], prompt_set: str,
             docs: list[dict]) -> dict[str, tuple[str, int] | None]:
    """``{prompt id: (variant, prompt_end)}`` of the response record whose response tokens
    are as many as the deltas (B's first, then A's)."""
    wheres = []
    for variant in reversed(pair):
        try:
            wheres.append(data.locate(exp, variant, prompt_set))
        except NotFound:
            continue
    out = {}
    for doc in docs:
        out[doc["prompt_id"]] = None
        for where in wheres:
            record = data.record(where, doc["prompt_id"], required=False)
            if record is not None and len(record["tokens"]) - record["prompt_end"] == len(
                    doc["delta"]):
                out[doc["prompt_id"]] = (where.variant, record["prompt_end"])
                break
    return out


def _span_out(rank: int, span: dict, z: float, offset: tuple[str, int] | None) -> dict:
    start, end = span["token_range"]
    return {"rank": rank, "prompt_id": span["prompt_id"], "text": span["text"],
            "mean_delta": span["mean_delta"], "max_delta": span["max_delta"],
            "n_tokens": span["n_tokens"], "z": z, "response_start": start,
            "response_end": end, "start": None if offset is None else offset[1] + start,
            "end": None if offset is None else offset[1] + end,
            "variant": None if offset is None else offset[0]}


def diff_spans(data: DashboardFiles, p: Params) -> dict[str, Any]:
    exp, a, b, folder = variant_pair(data, p)
    prompt_set = p.text("set")
    source = p.choice("source", SOURCES, "per_token")
    sort = p.choice("sort", SORTS, "abs")
    top = p.integer("top", TOP, 1, 1000)
    if source == "logprobs":
        trait, layer, docs = None, None, logprob_docs(data, p)[4]
    else:
        trait, layer, docs = _per_token_docs(data, p, exp, a, b, folder, prompt_set)
    values = np.concatenate([np.asarray(d["delta"], dtype=np.float64) for d in docs])  # (N,)
    mean, std = (float(values.mean()), float(values.std())) if values.size else (0.0, 0.0)
    spans = [s for d in docs for s in _clauses(d)]
    offsets = _offsets(data, exp, (a, b), prompt_set, docs)
    ranked = rank_spans(spans, sort, top)
    return {"source": source, "trait": trait, "layer": layer, "sort": sort,
            "n_spans": len(spans),
            "spans": [_span_out(i + 1, s, (s["mean_delta"] - mean) / std if std > 0 else 0.0,
                                offsets[s["prompt_id"]]) for i, s in enumerate(ranked)]}


def export_keys(data: DashboardFiles, name: str) -> Iterator[tuple[str, dict[str, str]]]:
    exp = data.experiment(name)
    for pair in diff_index(data, exp):
        base = {"exp": name, "a": pair["variant_a"], "b": pair["variant_b"]}
        for prompt_set in pair["compare"]:
            yield "model_diff", {**base, "set": prompt_set}
        for prompt_set in pair["logprobs"]:
            yield "logprob_diff", {**base, "set": prompt_set}
            for sort in SORTS:
                yield "diff_spans", {**base, "set": prompt_set, "source": "logprobs",
                                     "sort": sort, "top": str(TOP)}
        for entry in pair["per_token"]:
            for sort in SORTS:
                yield "diff_spans", {**base, "set": entry["set"], "source": "per_token",
                                     "trait": entry["trait"], "layer": str(entry["layer"]),
                                     "sort": sort, "top": str(TOP)}


HANDLERS = {"diff_spans": diff_spans}
