"""The Model Analysis and Model Diff views' answers: the calibration by layer (norms, massive
dims with the top5-at->=3-layers criterion, inter-layer cosine of the layer means), a model
diff's summary (``diff compare``), the behavioural diff (``diff logprobs``) and the ranked
clauses of the per-token and log-prob diffs (``diff per-token`` / ``diff logprobs``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.server.dashboard.files import (
    TOP5_MIN_LAYERS,
    DashboardFiles,
    Invalid,
    Params,
    b64,
    cmd,
    parse_json,
)
from residlab.server.dashboard.projections import top5_layers

__all__ = ["HANDLERS", "diff_index", "export_keys"]

COMPONENT_NORMS = {"attn": "attn_mean_norm", "mlp": "mlp_mean_norm"}


def read_doc(data: DashboardFiles, path: Path, command: str) -> Any:
    try:
        return data.load(path, parse_json)
    except Invalid as error:
        raise UsageError(f"{path} is not valid ({error}); make it again with '{command}'") from None


def read_prompt_docs(data: DashboardFiles, where: Path, ids: list[str], command: str,
                     valid: Callable[[dict], bool], need: str) -> list[dict]:
    """``{id}.json`` of every id in ``where`` with its ``prompt_id``; a document that is not
    an object passing ``valid`` says what it ``need``s and the command that makes it again."""
    docs = []
    for prompt_id in ids:
        path = data.child(where, f"{prompt_id}.json", is_dir=False)
        doc = read_doc(data, path, command)
        if not isinstance(doc, dict) or not valid(doc):
            raise UsageError(f"{path} needs {need}; make it again with '{command}'")
        docs.append({**doc, "prompt_id": prompt_id})
    return docs


# --- calibration ---------------------------------------------------------------------------------

def _massive(layers: list[int], entries: list[dict]) -> dict[str, Any]:
    """Every dim of any layer's top-k, its top-5 layers and its mean value by layer."""
    top5 = top5_layers(zip(layers, entries, strict=True))
    dims = sorted({int(d) for e in entries for d in e["dims"]},
                  key=lambda d: (-len(top5.get(d, [])), d))
    out = []
    for dim in dims:
        values, ratios = [], []
        for entry in entries:
            listed = [int(d) for d in entry["dims"]]
            mean = entry.get("mean")
            at = listed.index(dim) if dim in listed else None
            values.append(float(mean[dim]) if isinstance(mean, list) and dim < len(mean) else
                          None if at is None else float(entry["values"][at]))
            ratio = entry.get("ratio")
            ratios.append(None if at is None or not isinstance(ratio, list) else float(ratio[at]))
        count = len(top5.get(dim, []))
        out.append({"dim": dim, "top5_layers": top5.get(dim, []), "top5_count": count,
                    "criterion": count >= TOP5_MIN_LAYERS, "value_by_layer": values,
                    "ratio_by_layer": ratios})
    return {"top5_min_layers": TOP5_MIN_LAYERS,
            "criterion_dims": sorted(d for d, at in top5.items() if len(at) >= TOP5_MIN_LAYERS),
            "dims": out,
            "per_layer": [{"layer": layer, "dims": e["dims"], "values": e.get("values"),
                           "ratio": e.get("ratio")} for layer, e in zip(layers, entries,
                                                                        strict=True)]}


def _cosine(layers: list[int], entries: list[dict]) -> dict[str, Any] | None:
    """Cosine of the layer means, (L, L), and of each adjacent pair."""
    if not all(isinstance(e.get("mean"), list) for e in entries) or not entries:
        return None
    means = np.asarray([e["mean"] for e in entries], dtype=np.float64)  # (L, d)
    unit = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    matrix = unit @ unit.T  # (L, L)
    return {"layers": layers, "n": len(layers), "matrix_b64": b64(matrix),
            "adjacent": [float(matrix[i, i + 1]) for i in range(len(layers) - 1)]}


def calibration(data: DashboardFiles, p: Params) -> dict[str, Any]:
    exp = data.experiment(p.text("exp"))
    variant = data.variant(exp, p.text("variant"))
    command = cmd("calibrate", exp.name, model_variant=variant)
    path = data.calibration_file(exp, variant)
    if path is None:
        raise NotFound(f"no calibration of {variant} in {exp.name}; make it with '{command}'")
    doc = read_doc(data, path, command)
    try:
        layers = sorted(int(k) for k in doc["layers"])
        entries = [doc["layers"][str(layer)] for layer in layers]
        residual = [float(e["mean_norm"]) for e in entries]
        massive = _massive(layers, entries)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        raise UsageError(f"{path} is not a valid calibration file; make it again with "
                         f"'{command}'") from None
    norms: dict[str, Any] = {"residual": residual}
    for name, field in COMPONENT_NORMS.items():
        known = any(e.get(field) is not None for e in entries)
        norms[name] = [e.get(field) for e in entries] if known else None
    hint = None if norms["attn"] and norms["mlp"] else (
        "this calibration records the residual stream's norm only (no attention / MLP "
        "contributions)")
    return {"variant": variant, "prompt_set": doc.get("prompt_set"), "model": doc.get("model"),
            "top_k": doc.get("top_k"), "layers": layers,
            "n_tokens": [e.get("n_tokens") for e in entries], "norms": norms,
            "norms_hint": hint, "massive": massive, "cosine": _cosine(layers, entries)}


# --- model diff ----------------------------------------------------------------------------------

def variant_pair(data: DashboardFiles, p: Params) -> tuple[Experiment, str, str, Path | None]:
    exp = data.experiment(p.text("exp"))
    a, b = data.variant(exp, p.text("a")), data.variant(exp, p.text("b"))
    if a == b:
        raise UsageError(f"a={a} and b={b}: pick two different variants")
    return exp, a, b, data.child(data.root, exp.name, "model_diff", f"{a}_vs_{b}")


def diff_index(data: DashboardFiles, exp: Experiment) -> list[dict[str, Any]]:
    """Per variant pair with a ``model_diff`` folder: its compare, logprobs and per-token sets."""
    variants = list(exp.config.model_variants)
    base = data.child(data.root, exp.name, "model_diff")
    out = []
    for a in variants:
        for b in variants:
            folder = data.child(base, f"{a}_vs_{b}") if a != b else None
            if folder is None:
                continue
            compare = [s for s in data.dirs(folder) if s not in ("per_token_diff", "logprobs")
                       and data.child(folder, s, "results.json", is_dir=False) is not None]
            logprobs = [s for s in data.dirs(data.child(folder, "logprobs"))
                        if data.ids(data.child(folder, "logprobs", s))]
            per_token = []
            ptd = data.child(folder, "per_token_diff")
            for trait in data.traits_under(ptd):
                for name in data.dirs(data.trait_dir(ptd, trait)):
                    if name[:1] == "L" and name[1:].lstrip("-").isdigit():
                        for s in data.dirs(data.child(data.trait_dir(ptd, trait), name)):
                            per_token.append({"trait": trait, "layer": int(name[1:]), "set": s})
            per_token.sort(key=lambda e: (e["trait"], e["layer"], e["set"]))
            out.append({"variant_a": a, "variant_b": b, "compare": compare,
                        "logprobs": logprobs, "per_token": per_token})
    return out


def _diff_trait(trait: str, entry: dict) -> dict[str, Any]:
    layers = list(entry["layers"])
    peak = entry.get("peak_layer")
    at = layers.index(peak) if peak in layers else None

    def spread(field: str) -> float | None:
        return None if at is None else entry[field][at]

    fields = {"effect_size": "per_layer_effect_size",
              "paired_effect_size": "per_layer_paired_effect_size",
              "cosine": "per_layer_cosine_sim", "mean_a": "per_layer_mean_a",
              "mean_b": "per_layer_mean_b", "std_a": "per_layer_std_a",
              "std_b": "per_layer_std_b"}
    return {"trait": trait, **{k: entry.get(k) for k in ("method", "position", "component",
                                                         "selection")},
            "layers": layers, "peak_layer": peak,
            "peak_effect_size": entry.get("peak_effect_size"),
            "peak_paired_effect_size": entry.get("peak_paired_effect_size"),
            "spread_a": spread("per_layer_std_a"), "spread_b": spread("per_layer_std_b"),
            **{k: list(entry[v]) for k, v in fields.items()}}


def model_diff(data: DashboardFiles, p: Params) -> dict[str, Any]:
    exp, a, b, folder = variant_pair(data, p)
    prompt_set = p.text("set")
    command = cmd("diff compare", exp.name, variant_a=a, variant_b=b, prompt_set=prompt_set)
    path = None if prompt_set in ("per_token_diff", "logprobs") else data.child(
        folder, prompt_set, "results.json", is_dir=False)
    if path is None:
        raise NotFound(f"no model diff of {a} vs {b} on {prompt_set!r}; make it with "
                       f"'{command}'")
    doc = read_doc(data, path, command)
    try:
        traits = [_diff_trait(t, doc["traits"][t]) for t in sorted(doc["traits"])]
    except (KeyError, TypeError, IndexError, AttributeError):
        raise UsageError(f"{path} is not a valid model diff; make it again with "
                         f"'{command}'") from None
    return {"variant_a": a, "variant_b": b, "prompt_set": prompt_set,
            "n_prompts": doc.get("n_prompts"), "component": doc.get("component"),
            "vector_variant": doc.get("vector_variant"), "traits": traits}


def logprob_docs(data: DashboardFiles, p: Params) -> tuple[Experiment, str, str, str,
                                                            list[dict]]:
    exp, a, b, folder = variant_pair(data, p)
    prompt_set = p.text("set")
    command = cmd("diff logprobs", exp.name, variant_a=a, variant_b=b, prompt_set=prompt_set)
    where = data.child(folder, "logprobs", prompt_set)
    ids = data.ids(where)
    if not ids:
        raise NotFound(f"no log-prob diff of {a} vs {b} on {prompt_set!r}; make it with "
                       f"'{command}'")
    def valid(doc: dict) -> bool:
        lists = [doc.get(key) for key in ("delta", "kl", "tokens")]
        return all(isinstance(v, list) for v in lists) and len({len(v) for v in lists}) == 1

    docs = read_prompt_docs(data, where, ids, command, valid,
                            "'tokens', 'delta' and 'kl' lists of one length")
    return exp, a, b, prompt_set, docs


def logprob_diff(data: DashboardFiles, p: Params) -> dict[str, Any]:
    _, a, b, prompt_set, docs = logprob_docs(data, p)
    width = max(len(d["delta"]) for d in docs)
    sums = np.zeros((2, width))  # (2, T): delta, kl
    counts = np.zeros(width, dtype=np.int64)  # (T,)
    for doc in docs:
        n = len(doc["delta"])
        sums[0, :n] += doc["delta"]
        sums[1, :n] += doc["kl"]
        counts[:n] += 1
    means = sums / np.maximum(counts, 1)  # (2, T)
    every = [np.asarray(d[k], dtype=np.float64) for k in ("delta", "kl") for d in docs]
    deltas, kls = np.concatenate(every[:len(docs)]), np.concatenate(every[len(docs):])
    return {"variant_a": a, "variant_b": b, "prompt_set": prompt_set, "n_prompts": len(docs),
            "n_positions": width, "mean_delta": means[0].tolist(), "mean_kl": means[1].tolist(),
            "n_at": counts.tolist(),
            "overall": {"mean_delta": float(deltas.mean()) if deltas.size else None,
                        "mean_kl": float(kls.mean()) if kls.size else None,
                        "n_tokens": int(deltas.size)},
            "prompts": [{"prompt_id": d["prompt_id"], "n_tokens": len(d["delta"]),
                         "mean_delta": float(np.mean(d["delta"])) if d["delta"] else None,
                         "mean_kl": float(np.mean(d["kl"])) if d["kl"] else None}
                        for d in docs]}


def export_keys(data: DashboardFiles, name: str) -> Iterator[tuple[str, dict[str, str]]]:
    """The calibration of every variant that has one (diffs: :mod:`.diff_spans`)."""
    exp = data.experiment(name)
    for variant in exp.config.model_variants:
        if data.calibration_file(exp, variant) is not None:
            yield "calibration", {"exp": name, "variant": variant}


HANDLERS = {"calibration": calibration, "model_diff": model_diff, "logprob_diff": logprob_diff}
