"""The Steering view's answers: per trait and steered variant, the best trait score per layer
among runs at or above a coherence threshold (one line per setting and direction), the layer x
coefficient grids, the perturbation ratio of every run, and the response browser.

Means per (setting, layer, coefficient) are :func:`residlab.traits.steer_results.summarize`'s
(what ``residlab steer`` prints); a *setting* is every field it never averages across.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.server.dashboard.extraction import steering_rows
from residlab.server.dashboard.files import (
    MAX_PAGE,
    PAGE,
    DashboardFiles,
    Invalid,
    Params,
    cmd,
    parse_json,
)
from residlab.traits.steer_results import RESULT_FIELDS, setting_of, summarize

__all__ = ["HANDLERS", "export_keys", "steering_runs"]

DEFAULT_COHERENCE = 77
SORTS = ("layer", "coefficient", "trait", "coherence")
DIRECTIONS = ("all", "+", "-")
FACETS = ("vector_variant", "method", "position", "component", "judge")


def steering_runs(data: DashboardFiles, exp: Experiment) -> list[tuple[str, str]]:
    """``(trait, variant)`` of every ``steering/{trait}/{variant}/results.jsonl``."""
    base = data.child(data.root, exp.name, "steering")
    return [(trait, variant) for trait in data.traits_under(base)
            for variant in data.dirs(data.trait_dir(base, trait))
            if data.child(data.trait_dir(base, trait), variant, "results.jsonl",
                          is_dir=False) is not None]


def _definition(data: DashboardFiles, trait: str) -> str | None:
    """The trait's ``definition.txt`` (the judge's rubric): the project's ``datasets/traits``
    beside the experiments folder, then ``./datasets/traits``, then the shipped data."""
    roots = [data.root.parent / "datasets" / "traits", Path("datasets/traits"),
             Path(str(resources.files("residlab").joinpath("data/traits")))]
    for root in roots:
        path = data.child(data.trait_dir(root, trait), "definition.txt", is_dir=False)
        if path is not None:
            try:
                return path.read_text("utf-8").strip()
            except (OSError, UnicodeDecodeError):
                return None
    return None


def _rows(data: DashboardFiles, p: Params) -> tuple[Experiment, str, str, list[dict]]:
    exp = data.experiment(p.text("exp"))
    trait, variant = p.text("trait"), p.text("variant")
    rows = steering_rows(data, exp, trait, variant)
    if rows is None:
        command = cmd("steer", exp.name, trait=trait, model_variant=variant)
        raise NotFound(f"no steering results of {trait!r} for variant {variant!r} in "
                       f"{exp.name}; make them with '{command}'")
    try:
        for row in rows:
            float(row["coefficient"]), row["question"], row.get("layer")
            float(row["trait_score"]), float(row["coherence_score"])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"steering results of {trait} ({variant}) lack scores; run 'residlab "
                         f"steer --experiment {exp.name} --trait {trait} --rescore'") from None
    return exp, trait, variant, rows


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _key(setting: tuple, direction: str) -> str:
    return json.dumps([*setting, direction], separators=(",", ":"), ensure_ascii=False)


def _direction(coefficient: float) -> str | None:
    return "+" if coefficient > 0 else "-" if coefficient < 0 else None


def _h_norms(data: DashboardFiles, exp: Experiment, variant: str) -> dict[int, float] | None:
    """``{layer: mean token norm}`` from ``variant``'s calibration (None: none)."""
    path = data.calibration_file(exp, variant)
    if path is None:
        return None
    try:
        layers = data.load(path, parse_json)["layers"]
        return {int(k): float(v["mean_norm"]) for k, v in layers.items()
                if v.get("mean_norm") is not None}
    except (Invalid, KeyError, TypeError, ValueError, AttributeError):
        return None


def _run(entry: dict, key: str | None, threshold: int, norms: dict[int, float] | None) -> dict:
    h_norm = None if norms is None else norms.get(entry["layer"])
    ratio = abs(entry["coefficient"]) * 1.0 / h_norm if h_norm else None
    return {"key": key, "layer": entry["layer"], "coefficient": entry["coefficient"],
            "trait": entry["trait"], "coherence": entry["coherence"],
            "delta": _number(entry["gain"]), "n": entry["n"],
            "passes": entry["coherence"] >= threshold, "vector_norm": 1.0,
            "h_norm": h_norm, "ratio": ratio}


def _best(runs: list[dict], direction: str) -> list[dict]:
    """Per layer the best passing run: highest trait ("+"), lowest ("-"); then smaller |coef|."""
    sign = 1 if direction == "+" else -1
    by_layer: dict[int, dict] = {}
    for run in runs:
        if not run["passes"]:
            continue
        held = by_layer.get(run["layer"])
        rank = (sign * run["trait"], -abs(run["coefficient"]))
        if held is None or rank > (sign * held["trait"], -abs(held["coefficient"])):
            by_layer[run["layer"]] = run
    return [{k: by_layer[layer][k] for k in ("layer", "trait", "coherence", "coefficient",
                                              "delta", "n", "ratio")}
            for layer in sorted(by_layer)]


def _grid(setting: tuple, entries: list[dict], keys: dict[str, str | None]) -> dict[str, Any]:
    layers = sorted({e["layer"] for e in entries})
    coefficients = sorted({e["coefficient"] for e in entries})
    cells = {(e["layer"], e["coefficient"]): e for e in entries}

    def table(field: str) -> list[list]:
        return [[(_number(cells[(la, c)][field]) if field != "n" else cells[(la, c)]["n"])
                 if (la, c) in cells else None for c in coefficients] for la in layers]

    return {"key_plus": keys.get("+"), "key_minus": keys.get("-"),
            **dict(zip(RESULT_FIELDS, setting, strict=True)), "layers": layers,
            "coefficients": coefficients, "delta": table("gain"),
            "coherence": table("coherence"), "trait": table("trait"), "n": table("n")}


def _setting_parts(setting: tuple, entries: list[dict], baseline: dict | None, threshold: int,
                   norms: dict[int, float] | None) -> tuple[list, dict, list]:
    """``(lines, grid, runs)`` of one setting."""
    steered = [e for e in entries if e["layer"] is not None]
    directions = sorted({d for e in steered if (d := _direction(e["coefficient"]))},
                        key="+-".index)
    keys = {d: _key(setting, d) for d in directions}
    runs = [_run(e, keys.get(_direction(e["coefficient"])), threshold, norms) for e in steered]
    shown = None if baseline is None else {"trait": baseline["trait"],
                                           "coherence": baseline["coherence"],
                                           "n": baseline["n"]}
    lines = [{"key": keys[d], "direction": d, **dict(zip(RESULT_FIELDS, setting, strict=True)),
              "baseline": shown, "points": _best([r for r in runs if r["key"] == keys[d]], d)}
             for d in directions]
    return lines, _grid(setting, steered, keys) if steered else None, runs


def steering(data: DashboardFiles, p: Params) -> dict[str, Any]:
    exp, trait, variant, rows = _rows(data, p)
    threshold = p.integer("min_coherence", DEFAULT_COHERENCE, 0, 100)
    summary = summarize(rows)
    norms = _h_norms(data, exp, variant)
    settings: dict[tuple, list[dict]] = {}
    for entry in summary:
        settings.setdefault(setting_of(entry), []).append(entry)
    lines, grids, runs = [], [], []
    for setting, entries in settings.items():
        baselines = [e for e in entries if e["layer"] is None]
        parts = _setting_parts(setting, entries, baselines[-1] if baselines else None,
                               threshold, norms)
        lines += parts[0]
        grids += [parts[1]] if parts[1] else []
        runs += parts[2]
    steered = [e for e in summary if e["layer"] is not None]
    facets = {name: sorted({e.get(name) for e in summary if e.get(name) is not None}, key=str)
              for name in FACETS}
    facets["direction"] = [d for d in "+-" if any(line["direction"] == d for line in lines)]
    facets["layers"] = sorted({e["layer"] for e in steered})
    facets["coefficients"] = sorted({e["coefficient"] for e in steered})
    hint = None if norms is not None else (
        "perturbation ratios need the calibration of this variant: run "
        f"'{cmd('calibrate', exp.name, model_variant=variant)}'")
    return {"trait": trait, "variant": variant, "min_coherence": threshold,
            "definition": _definition(data, trait), "facets": facets, "lines": lines,
            "grids": grids, "runs": runs, "ratio_hint": hint}


# --- response browser ----------------------------------------------------------------------------

def _tie(row: dict) -> tuple:
    return row["layer"], float(row["coefficient"]), row["question"], str(row.get("judge"))


def _sort_key(sort: str):
    """layer / coefficient ascending, trait / coherence descending; ties by :func:`_tie`."""
    if sort == "layer":
        return _tie
    if sort == "coefficient":
        return lambda r: (float(r["coefficient"]), *_tie(r))
    field = "trait_score" if sort == "trait" else "coherence_score"
    return lambda r: (-float(r[field]), *_tie(r))


def _item(index: int, row: dict, baseline: dict | None) -> dict[str, Any]:
    direction = _direction(float(row["coefficient"]))
    return {"index": index, "key": direction and _key(setting_of(row), direction),
            **{k: row.get(k) for k in ("method", "position", "component", "vector_variant",
                                       "positions", "max_new_tokens", "layer")},
            "coefficient": float(row["coefficient"]), "question": row["question"],
            "answer": row.get("answer"), "trait_score": float(row["trait_score"]),
            "coherence_score": float(row["coherence_score"]), "judge": row.get("judge"),
            "baseline_answer": None if baseline is None else baseline.get("answer"),
            "baseline_trait_score": None if baseline is None else float(
                baseline["trait_score"])}


def steering_responses(data: DashboardFiles, p: Params) -> dict[str, Any]:
    exp, trait, variant, rows = _rows(data, p)
    layer = p.params.get("layer") or "all"
    if layer != "all":
        layer = p.integer("layer")
    direction = p.choice("direction", DIRECTIONS, "all")
    sort = p.choice("sort", SORTS, "layer")
    offset = p.integer("offset", 0, 0)
    limit = p.integer("limit", PAGE, 1, MAX_PAGE)
    baselines: dict[tuple, dict] = {}
    for row in rows:
        if row.get("layer") is None:
            baselines.setdefault((setting_of(row), row["question"]), row)
    chosen = [r for r in rows if r.get("layer") is not None
              and (layer == "all" or r["layer"] == layer)
              and (direction == "all" or _direction(float(r["coefficient"])) == direction)]
    chosen.sort(key=_sort_key(sort))
    items = [_item(i, row, baselines.get((setting_of(row), row["question"])))
             for i, row in enumerate(chosen[offset:offset + limit], start=offset)]
    return {"trait": trait, "variant": variant, "definition": _definition(data, trait),
            "total": len(chosen), "offset": offset, "limit": limit, "layer": str(layer),
            "direction": direction, "sort": sort, "items": items}


def export_keys(data: DashboardFiles, name: str) -> Iterator[tuple[str, dict[str, str]]]:
    exp = data.experiment(name)
    for trait, variant in steering_runs(data, exp):
        base = {"exp": name, "trait": trait, "variant": variant}
        for threshold in range(101):
            yield "steering", {**base, "min_coherence": str(threshold)}
        total = sum(1 for r in steering_rows(data, exp, trait, variant) or []
                    if r.get("layer") is not None)
        for sort in SORTS:
            for offset in range(0, max(total, 1), PAGE):
                yield "steering_responses", {**base, "layer": "all", "direction": "all",
                                             "sort": sort, "offset": str(offset),
                                             "limit": str(PAGE)}


HANDLERS = {"steering": steering, "steering_responses": steering_responses}
