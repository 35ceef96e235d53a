"""The Extraction view's answers: the best-vector table and the layer x method grids of
held-out accuracy and effect size per trait, the vector logit lens (``extract-viz --vectors``)
and the contrastive data browser (``completions.json``).

Stats come from the vector files' headers (what ``extract`` stored beside each vector); "best"
follows :func:`residlab.traits.select.select_vectors` with ``layer="best"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.server.dashboard.files import (
    MAX_PAGE,
    PAGE,
    DashboardFiles,
    Invalid,
    Params,
    cmd,
    parse_json,
)
from residlab.traits.positions import position_slug
from residlab.traits.steer_results import summarize

__all__ = ["HANDLERS", "export_keys", "extraction_entries", "steering_rows"]

MIN_COHERENCE = 77  # select_vectors' default: the "best" the commands pick
STAT_FIELDS = ("accuracy", "effect_size", "baseline", "norm", "n_train", "n_test", "flipped")


def _parse_header(path: Path, data: bytes) -> dict[str, Any]:
    """The ``residlab`` metadata of a vector file (its safetensors header only)."""
    try:
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + length])
        meta = json.loads(header["__metadata__"]["residlab"])
        int(meta["layer"])
    except (ValueError, KeyError, TypeError):
        raise Invalid("no residlab metadata in its header") from None
    return meta


def _parse_jsonl(path: Path, data: bytes) -> list[dict]:
    import orjson

    rows = [orjson.loads(line) for line in data.splitlines() if line.strip()]
    if not all(isinstance(row, dict) for row in rows):
        raise Invalid("a line is not a JSON object")
    return rows


def extraction_entries(data: DashboardFiles, exp: Experiment) -> list[tuple[str, str, Path]]:
    """``(trait, variant, folder)`` of every extraction folder that has a ``vectors`` folder."""
    base = data.child(data.root, exp.name, "extraction")
    out = []
    for trait in data.traits_under(base):
        folder = data.trait_dir(base, trait)
        for variant in data.dirs(folder):
            if data.child(folder, variant, "vectors") is not None:
                out.append((trait, variant, data.child(folder, variant)))
    return out


def _vectors(data: DashboardFiles, folder: Path) -> list[dict[str, Any]]:
    """Every stored vector's identity and stats (``vectors/{pos}/{comp}/{method}/layer{L}``)."""
    out = []
    vectors = data.child(folder, "vectors")
    for slug in data.dirs(vectors):
        for component in data.dirs(data.child(vectors, slug)):
            for method in data.dirs(data.child(vectors, slug, component)):
                where = data.child(vectors, slug, component, method)
                for name in sorted(data.file_names(where, ".safetensors")):
                    path = data.child(where, f"{name}.safetensors", is_dir=False)
                    try:
                        meta = data.load(path, _parse_header)
                    except Invalid as error:
                        raise UsageError(f"{path} is not a valid vector file ({error}); extract "
                                         "it again with 'residlab extract'") from None
                    out.append({**meta, "method": method, "component": component,
                                "slug": slug, "layer": int(meta["layer"]), "path": path})
    return out


def steering_rows(data: DashboardFiles, exp: Experiment, trait: str,
                  variant: str) -> list[dict] | None:
    """The judged rows of ``steering/{trait}/{variant}/results.jsonl`` (None: no file)."""
    folder = data.trait_dir(data.child(data.root, exp.name, "steering"), trait)
    path = data.child(folder, variant, "results.jsonl", is_dir=False)
    if path is None:
        return None
    try:
        return data.load(path, _parse_jsonl)
    except Invalid as error:
        raise UsageError(f"{path} is not a valid results file ({error}); run 'residlab steer "
                         f"--experiment {exp.name} --trait {trait}' again") from None


def _steering_pick(rows: list[dict] | None, candidates: list[dict], component: str,
                   variant: str) -> tuple[dict, str] | None:
    """select's steering rule: the largest direction-aware gain at coherence >= 77 among
    rows of these very vectors, when it is a gain."""
    if not rows:
        return None
    keys = {(c["method"], c["layer"], c["slug"]) for c in candidates}
    summary = [r for r in summarize(rows) if r["layer"] is not None
               and r["coherence"] >= MIN_COHERENCE and r.get("component") == component
               and r.get("vector_variant") == variant and r.get("position") is not None
               and (r["method"], r["layer"], position_slug(r["position"])) in keys]
    if not summary:
        return None
    best = max(summary, key=lambda r: r["gain"] * (1 if r["coefficient"] > 0 else -1))
    if best["gain"] * (1 if best["coefficient"] > 0 else -1) <= 0:
        return None
    chosen = next(c for c in candidates if (c["method"], c["layer"], c["slug"]) == (
        best["method"], best["layer"], position_slug(best["position"])))
    return chosen, (f"steering raised the trait by {best['gain']:+.1f} at coefficient "
                    f"{best['coefficient']:g} with coherence {best['coherence']:.0f}")


def _best_row(vectors: list[dict], component: str, rows: list[dict] | None,
              variant: str) -> dict[str, Any]:
    candidates = [v for v in vectors if v["component"] == component]
    picked = _steering_pick(rows, candidates, component, variant)
    if picked is None:
        chosen = max(candidates, key=lambda c: (c.get("effect_size", float("-inf")),
                                                -c["layer"]))
        how = "effect_size"
        reason = (f"highest held-out effect size (d={chosen.get('effect_size', 0):.2f}) "
                  "among stored vectors")
    else:
        (chosen, reason), how = picked, "steering"
    return {"component": component, "method": chosen["method"],
            "position": chosen.get("position"), "layer": chosen["layer"],
            **{k: chosen.get(k) for k in STAT_FIELDS}, "chosen_by": how, "reason": reason}


def _grid(vectors: list[dict]) -> dict[str, Any]:
    """Methods x layers of accuracy and effect size of one (position, component)."""
    methods = sorted({v["method"] for v in vectors})
    layers = sorted({v["layer"] for v in vectors})
    cells = {(v["method"], v["layer"]): v for v in vectors}

    def table(field: str) -> list[list[float | None]]:
        return [[cells[(m, layer)].get(field) if (m, layer) in cells else None
                 for layer in layers] for m in methods]

    best = max(vectors, key=lambda v: (v.get("effect_size", float("-inf")), -v["layer"]))
    return {"position": vectors[0].get("position"), "component": vectors[0]["component"],
            "methods": methods, "layers": layers, "accuracy": table("accuracy"),
            "effect_size": table("effect_size"),
            "best": {"method": best["method"], "layer": best["layer"],
                     "accuracy": best.get("accuracy"), "effect_size": best.get("effect_size")}}


def _trait_entry(data: DashboardFiles, exp: Experiment, trait: str, variant: str,
                 folder: Path) -> dict[str, Any] | None:
    vectors = _vectors(data, folder)
    if not vectors:
        return None
    rows = steering_rows(data, exp, trait, variant)
    components = sorted({v["component"] for v in vectors})
    groups = sorted({(v["slug"], v["component"]) for v in vectors})
    return {"trait": trait, "category": trait.split("/")[0], "name": trait.split("/")[1],
            "variant": variant,
            "best": [_best_row(vectors, c, rows, variant) for c in components],
            "grids": [_grid([v for v in vectors if (v["slug"], v["component"]) == g])
                      for g in groups],
            "vector_lens": data.child(folder, "logit_lens.json", is_dir=False) is not None,
            "completions": data.child(folder, "completions.json", is_dir=False) is not None}


def extraction(data: DashboardFiles, p: Params) -> dict[str, Any]:
    exp = data.experiment(p.text("exp"))
    traits = [entry for trait, variant, folder in extraction_entries(data, exp)
              if (entry := _trait_entry(data, exp, trait, variant, folder)) is not None]
    hints = {}
    if not traits:
        hints["trait vectors"] = cmd("extract", exp.name, traits="CATEGORY/NAME")
    return {"exp": exp.name, "min_coherence": MIN_COHERENCE, "traits": traits, "hints": hints}


def _folder(data: DashboardFiles, p: Params) -> tuple[Experiment, str, str, Path]:
    """The extraction folder of ``(trait, variant)`` from the listings, else 404."""
    exp = data.experiment(p.text("exp"))
    trait, variant = p.text("trait"), p.text("variant")
    base = data.trait_dir(data.child(data.root, exp.name, "extraction"), trait)
    folder = data.child(base, variant)
    if folder is None:
        command = cmd("extract", exp.name, traits=trait, model_variant=variant)
        raise NotFound(f"no extraction of trait {trait!r} for variant {variant!r} in "
                       f"{exp.name}; run '{command}'")
    return exp, trait, variant, folder


def vector_lens(data: DashboardFiles, p: Params) -> dict[str, Any]:
    exp, trait, variant, folder = _folder(data, p)
    path = data.child(folder, "logit_lens.json", is_dir=False)
    command = (cmd("extract-viz", exp.name, traits=trait, extraction_variant=variant)
               + " --vectors")
    if path is None:
        raise NotFound(f"no vector logit lens of {trait} ({variant}); make it with '{command}'")
    try:
        doc = data.load(path, parse_json)
        vectors = [{k: v.get(k) for k in ("method", "layer", "position", "component", "norm",
                                          "toward", "away")} for v in doc["vectors"]]
    except (Invalid, KeyError, TypeError, AttributeError):
        raise UsageError(f"{path} is not a valid vector logit lens file; make it again with "
                         f"'{command}'") from None
    return {"trait": trait, "variant": variant, "top_k": doc.get("top_k"),
            "vocab_size": doc.get("vocab_size"), "filter_common": doc.get("filter_common"),
            "common": doc.get("common") or {"toward": [], "away": []}, "vectors": vectors}


def _test_pairs(data: DashboardFiles, folder: Path) -> list[int] | None:
    """The held-out pair indices recorded in the first vectors' metadata.json."""
    vectors = data.child(folder, "vectors")
    for slug in data.dirs(vectors):
        for component in data.dirs(data.child(vectors, slug)):
            for method in data.dirs(data.child(vectors, slug, component)):
                path = data.child(vectors, slug, component, method, "metadata.json",
                                  is_dir=False)
                try:
                    pairs = data.load(path, parse_json)["test_pairs"] if path else None
                except (Invalid, KeyError, TypeError):
                    pairs = None
                if isinstance(pairs, list):
                    return [int(i) for i in pairs]
    return None


def _side(records: list, index: int) -> dict[str, Any] | None:
    if index >= len(records) or not isinstance(records[index], dict):
        return None
    record = records[index]
    return {"text": record.get("text"), "completion": record.get("completion")}


def contrastive(data: DashboardFiles, p: Params) -> dict[str, Any]:
    exp, trait, variant, folder = _folder(data, p)
    offset = p.integer("offset", 0, 0)
    limit = p.integer("limit", PAGE, 1, MAX_PAGE)
    path = data.child(folder, "completions.json", is_dir=False)
    command = cmd("extract", exp.name, traits=trait, model_variant=variant)
    if path is None:
        raise NotFound(f"no completions.json for {trait} ({variant}); make it with '{command}'")
    try:
        doc = data.load(path, parse_json)
        positive, negative = doc.get("positive") or [], doc.get("negative") or []
        if not isinstance(positive, list) or not isinstance(negative, list):
            raise Invalid("positive / negative are not lists")
    except (Invalid, AttributeError):
        raise UsageError(f"{path} is not a valid completions file; make it again with "
                         f"'{command}'") from None
    total = max(len(positive), len(negative))
    held = _test_pairs(data, folder)
    items = [{"index": i, "held_out": None if held is None else i in held,
              "positive": _side(positive, i), "negative": _side(negative, i)}
             for i in range(offset, min(offset + limit, total))]
    return {"trait": trait, "variant": variant, "max_new_tokens": doc.get("max_new_tokens"),
            "total": total, "offset": offset, "limit": limit, "test_pairs": held,
            "items": items}


def export_keys(data: DashboardFiles, name: str) -> Iterator[tuple[str, dict[str, str]]]:
    exp = data.experiment(name)
    yield "extraction", {"exp": name}
    for trait, variant, folder in extraction_entries(data, exp):
        base = {"exp": name, "trait": trait, "variant": variant}
        if data.child(folder, "logit_lens.json", is_dir=False) is not None:
            yield "vector_lens", base
        try:
            total = contrastive(data, Params({**base, "offset": "0", "limit": "1"}))["total"]
        except NotFound:
            continue
        for offset in range(0, max(total, 1), PAGE):
            yield "contrastive", {**base, "offset": str(offset), "limit": str(PAGE)}


HANDLERS = {"extraction": extraction, "vector_lens": vector_lens, "contrastive": contrastive}
