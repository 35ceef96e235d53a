"""Part 1's export keys: every request the Inference view and the Layer Deep Dive can make for
one experiment, as the page sends them (for the static export)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from residlab.analysis.model_diff.per_token import id_sort_key
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.server.dashboard import projections as pj
from residlab.server.dashboard.deepdive import file_rows, parse_lens, viz_file
from residlab.server.dashboard.files import (
    CLEAN,
    PAGE,
    SPAN_TOP,
    SPAN_WINDOWS,
    DashboardFiles,
    Params,
    Where,
)
from residlab.server.dashboard.inference import viz_index
from residlab.server.dashboard.projections import Projection
from residlab.server.dashboard.spans import span_table

__all__ = ["export_keys"]


def _projection_keys(data: DashboardFiles, where: Where, base: dict[str, str],
                     ids: list[str], traits: dict) -> Iterator[tuple[str, dict[str, str]]]:
    for trait in traits:
        for prompt_id in ids:
            try:
                files, _ = pj.trait_files(data, where, trait, prompt_id)
            except NotFound:
                continue
            for clean in pj.clean_available(data, where, list(files.values())):
                yield "projections", {**base, "id": prompt_id, "trait": trait, "clean": clean}


def _norm_keys(data: DashboardFiles, where: Where, base: dict[str, str], ids: list[str],
               traits: dict) -> Iterator[tuple[str, dict[str, str]]]:
    layers = sorted({layer for entry in traits.values() for layer in entry["layers"]})
    calibrated = pj.top5(data, where.exp, where.variant) is not None
    for prompt_id in ids:
        for layer in layers:
            try:
                file: Projection = pj.norm_file(data, where, prompt_id, layer)
            except NotFound:
                continue
            cleans = ["none"] + (["top5"] if calibrated and file.dims else []) + (
                ["all"] if file.dims else [])
            for clean in (c for c in CLEAN if c in cleans):
                yield "norms", {**base, "id": prompt_id, "layer": str(layer), "clean": clean}


def _viz_keys(data: DashboardFiles, where: Where, base: dict[str, str],
              viz: dict[str, list[str]]) -> Iterator[tuple[str, dict[str, str]]]:
    for prompt_id in viz.get("lens", []):
        path = viz_file(data, where, f"{prompt_id}_logit_lens.json")
        for token in range(len(data.load(path, parse_lens)["predictions"])):
            yield "lens", {**base, "id": prompt_id, "token": str(token)}
    for prompt_id in viz.get("attention", []):
        path = viz_file(data, where, f"{prompt_id}_attention.safetensors")
        _, layers, _ = file_rows(path, where, 0)
        n_tokens = _attention_tokens(path)
        for token in range(n_tokens):
            params = {**base, "id": prompt_id, "token": str(token)}
            yield "attention", params
            for layer in layers:
                yield "attention", {**params, "layer": str(layer)}


def _attention_tokens(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return int(handle.get_slice("attention").get_shape()[2])


def _set_keys(data: DashboardFiles, where: Where) -> Iterator[tuple[str, dict[str, str]]]:
    base = {"exp": where.exp.name, "variant": where.variant, "set": where.prompt_set}
    ids = data.ids(where.responses)
    for offset in range(0, max(len(ids), 1), PAGE):
        yield "prompts", {**base, "offset": str(offset), "limit": str(PAGE)}
    for prompt_id in ids:
        yield "response", {**base, "id": prompt_id}
    traits = pj.projection_index(data, where.exp, where.variant).get(where.prompt_set, {})
    yield from _projection_keys(data, where, base, ids, traits)
    yield from _norm_keys(data, where, base, ids, traits)
    viz = viz_index(data, where.exp, where.variant).get(where.prompt_set, {})
    yield from _viz_keys(data, where, base, viz)


def _span_keys(data: DashboardFiles, exp: Experiment) -> Iterator[tuple[str, dict[str, str]]]:
    """Every ordered pair of variants with projections of the same set and trait."""
    variants = list(exp.config.model_variants)
    index = {v: pj.projection_index(data, exp, v) for v in variants}
    combos = [("clause", 8)] + [("window", w) for w in SPAN_WINDOWS]
    for a in variants:
        for b in variants:
            if a == b:
                continue
            for prompt_set in sorted(set(index[a]) & set(index[b])):
                for trait in sorted(set(index[a][prompt_set]) & set(index[b][prompt_set])):
                    yield from _pair_keys(data, exp, (a, b), prompt_set, trait, index, combos)


def _pair_keys(data: DashboardFiles, exp: Experiment, pair: tuple[str, str], prompt_set: str,
               trait: str, index: dict, combos: list) -> Iterator[tuple[str, dict[str, str]]]:
    a, b = pair
    entries = index[a][prompt_set][trait], index[b][prompt_set][trait]
    layers: list[int | None] = sorted(set(entries[0]["layers"]) & set(entries[1]["layers"]))
    if entries[0]["default_layer"] == entries[1]["default_layer"] is not None:
        layers.append(None)
    base = {"exp": exp.name, "set": prompt_set, "a": a, "b": b, "trait": trait,
            "top": str(SPAN_TOP)}
    for layer in layers:
        params = base if layer is None else {**base, "layer": str(layer)}
        try:
            table, _, _ = span_table(data, Params({**params, "mode": "clause",
                                                   "window": "8"}))
        except UsageError:  # vectors or tokens that do not pair: the page shows the error
            continue
        for mode, window in combos:
            keyed = {**params, "mode": mode, "window": str(window)}
            yield "spans", {**keyed, "scope": "set"}
            for prompt_id in sorted(table, key=id_sort_key):
                yield "spans", {**keyed, "scope": "prompt", "id": prompt_id}


def export_keys(data: DashboardFiles, name: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Every ``(endpoint, params)`` the page can request for experiment ``name``."""
    exp = data.experiment(name)
    yield "experiments", {}
    yield "experiment", {"exp": name}
    for variant in exp.config.model_variants:
        for prompt_set in data.prompt_sets(exp, variant):
            yield from _set_keys(data, data.locate(exp, variant, prompt_set))
    yield from _span_keys(data, exp)
