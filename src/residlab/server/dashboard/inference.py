"""Part 1's endpoints: the experiment list, one experiment's index, prompts, one response,
projections and norms (the Inference view). Registered in the dispatch table of
:class:`residlab.server.dashboard.data.DashboardData` through :data:`HANDLERS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from residlab.analysis.model_diff.per_token import id_sort_key
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.server.dashboard import projections as pj
from residlab.server.dashboard.files import (
    CLEAN,
    MAX_PAGE,
    PAGE,
    PREVIEW_CHARS,
    DashboardFiles,
    Params,
    b64,
    cmd,
    log,
)

__all__ = ["HANDLERS", "all_traits", "diffs", "viz_index"]


# --- experiments / experiment -------------------------------------------------------------


def experiments(data: DashboardFiles, p: Params) -> dict[str, Any]:
    out = []
    for name in data.experiment_names():
        try:
            exp = data.experiment(name)
        except UsageError as error:
            log.warning("experiment %s skipped: %s", name, error)
            continue
        out.append({"name": name, "variants": list(exp.config.model_variants),
                    "defaults": exp.config.defaults.model_dump()})
    return {"experiments": out}


def experiment(data: DashboardFiles, p: Params) -> dict[str, Any]:
    exp = data.experiment(p.text("exp"))
    variants = list(exp.config.model_variants)
    sets = {v: data.prompt_sets(exp, v) for v in variants}
    projections = {v: pj.projection_index(data, exp, v) for v in variants}
    calibration = {v: data.calibration_file(exp, v) is not None for v in variants}
    return {
        "name": exp.name, "variants": variants,
        "defaults": exp.config.defaults.model_dump(),
        "traits": [{"trait": t, "category": t.split("/")[0], "name": t.split("/")[1]}
                   for t in all_traits(data, exp, variants)],
        "prompt_sets": {v: [set_entry(data, exp, v, s) for s in sets[v]] for v in variants},
        "projections": projections,
        "viz": {v: viz_index(data, exp, v) for v in variants},
        "diffs": diffs(data, exp, variants),
        "calibration": calibration,
        "hints": hints(data, exp, sets, projections, calibration),
    }


def set_entry(data: DashboardFiles, exp: Experiment, variant: str,
              prompt_set: str) -> dict[str, Any]:
    folder, source = data.responses_of(exp, variant, prompt_set)
    return {"name": prompt_set, "n_prompts": len(data.ids(folder)),
            "responses_from": source}


def all_traits(data: DashboardFiles, exp: Experiment, variants: Sequence[str]) -> list[str]:
    found = set(data.traits_under(data.child(data.root, exp.name, "extraction")))
    for variant in variants:
        found |= set(data.traits_under(data.inference(exp, variant, "projections")))
    return sorted(found)


def viz_index(data: DashboardFiles, exp: Experiment,
              variant: str) -> dict[str, dict[str, list[str]]]:
    base = data.child(data.root, exp.name, "analysis", "per_token", variant)
    out = {}
    for prompt_set in data.dirs(base):
        folder = data.child(base, prompt_set)
        lens = sorted(data.file_names(folder, "_logit_lens.json"), key=id_sort_key)
        attention = sorted(data.file_names(folder, "_attention.safetensors"), key=id_sort_key)
        if lens or attention:
            out[prompt_set] = {"lens": lens, "attention": attention}
    return out


def diffs(data: DashboardFiles, exp: Experiment, variants: Sequence[str]) -> list[dict[str, Any]]:
    base = data.child(data.root, exp.name, "model_diff")
    out = []
    for name in data.dirs(base):
        pair = next(((a, b) for a in variants for b in variants
                     if a != b and name == f"{a}_vs_{b}"), None)
        if pair is None:
            continue
        folder = data.child(base, name)
        sets = [s for s in data.dirs(folder) if s not in ("per_token_diff", "logprobs")
                and data.child(folder, s, "results.json", is_dir=False) is not None]
        out.append({"variant_a": pair[0], "variant_b": pair[1], "prompt_sets": sets})
    return out


def hints(data: DashboardFiles, exp: Experiment, sets: dict[str, list[str]], projections: dict,
          calibration: dict[str, bool]) -> dict[str, str]:
    """What is missing, each with the command that makes it."""
    hints = {}
    app = exp.variant(None)[0]
    extraction = exp.variant(None, "extraction")[0]
    if not any(sets.values()):
        hints["responses"] = cmd("responses", exp.name, prompt_set="PROMPT_SET",
                                 model_variant=app)
    if not data.traits_under(data.child(data.root, exp.name, "extraction")):
        hints["trait vectors"] = cmd("extract", exp.name, traits="CATEGORY/NAME",
                                     model_variant=extraction)
    for variant, names in sets.items():
        for prompt_set in names:
            if prompt_set in projections[variant]:
                continue
            captured = data.inference(exp, variant, "raw", "residual", prompt_set)
            kind = "project" if captured is not None else "capture"
            what = "projections" if kind == "project" else "captures"
            hints[f"{what} of {variant} on {prompt_set}"] = cmd(
                kind, exp.name, prompt_set=prompt_set, model_variant=variant)
    for variant, held in calibration.items():
        if not held and projections[variant]:
            hints[f"calibration of {variant}"] = cmd("calibrate", exp.name,
                                                     model_variant=variant)
    viz = any(viz_index(data, exp, v) for v in sets)
    if not viz and sets.get(app):
        hints["logit lens and attention"] = cmd(
            "extract-viz", exp.name, prompt_set=sets[app][0], model_variant=app) + \
            " --logit-lens --attention --layers 0,-1"
    return hints


# --- prompts / response ------------------------------------------------------------------


def prompts(data: DashboardFiles, p: Params) -> dict[str, Any]:
    where = data.where(p)
    offset = p.integer("offset", 0, 0)
    limit = p.integer("limit", PAGE, 1, MAX_PAGE)
    ids = data.ids(where.responses)
    items = []
    for prompt_id in ids[offset:offset + limit]:
        record = data.record(where, prompt_id)
        items.append({"id": prompt_id, "prompt": str(record.get("prompt") or "")[
            :PREVIEW_CHARS], "note": record.get("prompt_note"),
            "tags": record.get("tags") or [], "n_tokens": len(record["token_ids"]),
            "prompt_end": record["prompt_end"]})
    return {"total": len(ids), "offset": offset, "limit": limit,
            "responses_from": where.responses_from, "items": items}


def response(data: DashboardFiles, p: Params) -> dict[str, Any]:
    where = data.where(p)
    prompt_id = p.text("id")
    record = data.record(where, prompt_id)
    ids = data.ids(where.responses)
    return {"id": prompt_id, "prompt": record.get("prompt"),
            "response": record.get("response"), "system_prompt": record.get("system_prompt"),
            "note": record.get("prompt_note"), "tags": record.get("tags") or [],
            "tokens": record["tokens"], "token_ids": record["token_ids"],
            "prompt_end": record["prompt_end"], "responses_from": where.responses_from,
            # the id's place in the set's list (the picker opens the page holding it)
            "index": ids.index(prompt_id) if prompt_id in ids else None}


# --- projections / norms -------------------------------------------------------------------


def projections(data: DashboardFiles, p: Params) -> dict[str, Any]:
    where = data.where(p)
    prompt_id, trait = p.text("id"), p.text("trait")
    clean = p.choice("clean", CLEAN, "none")
    files, default = pj.trait_files(data, where, trait, prompt_id)
    available = pj.clean_available(data, where, list(files.values()))
    if clean not in available:
        pj.clean_dims(data, where, next(iter(files.values())), clean)  # says why
        raise NotFound(f"clean={clean} is not available for {trait} (the vector it was "
                       "projected on is gone); use one of " + ", ".join(available))
    n_tokens, prompt_end, start = pj.span_of(data, where, prompt_id, files.get(
        default, next(iter(files.values()))))
    layers = []
    for layer, file in files.items():
        chosen = pj.clean_dims(data, where, file, clean)
        proj, norms = pj.cleaned(file, chosen, pj.unit_vector(data, where.exp, file) if chosen
                                    else None)
        response = norms[norms.size - file.n_response:]
        source = file.source
        layers.append({"layer": layer, "start": pj.span_of(data, where, prompt_id, file)[2],
                       "method": source.get("method"), "position": source.get("position"),
                       "component": source.get("component"), "centered": file.centered,
                       "projection_b64": b64(proj),
                       "mean_response_norm": float(response.mean()) if response.size
                       else None,
                       "massive_dims_removed": [file.dims[i] for i in chosen]})
    return {"trait": trait, "n_tokens": n_tokens, "prompt_end": prompt_end, "start": start,
            "default_layer": default, "clean": clean, "clean_available": available,
            "layers": layers}


def norms(data: DashboardFiles, p: Params) -> dict[str, Any]:
    where = data.where(p)
    prompt_id = p.text("id")
    layer = p.integer("layer")
    clean = p.choice("clean", CLEAN, "none")
    file = pj.norm_file(data, where, prompt_id, layer)
    n_tokens, _, start = pj.span_of(data, where, prompt_id, file)
    _, norms = pj.cleaned(file, pj.clean_dims(data, where, file, clean), None)
    response = norms[norms.size - file.n_response:]
    return {"layer": layer, "n_tokens": n_tokens, "start": start, "norms_b64": b64(norms),
            "mean_response_norm": float(response.mean()) if response.size else None}


HANDLERS = {"experiments": experiments, "experiment": experiment, "prompts": prompts,
            "response": response, "projections": projections, "norms": norms}
