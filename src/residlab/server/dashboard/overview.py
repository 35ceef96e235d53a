"""What part 2's views can show for one experiment (``overview``): the extractions, steering
runs, calibrations, model diffs and noising runs found, and the command that makes each
missing one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from residlab.server.dashboard import noising
from residlab.server.dashboard.analysis import diff_index
from residlab.server.dashboard.extraction import extraction_entries, steering_rows
from residlab.server.dashboard.files import DashboardFiles, Params, cmd
from residlab.server.dashboard.steering import steering_runs

__all__ = ["HANDLERS", "export_keys"]


def _names(trait: str) -> dict[str, str]:
    return {"trait": trait, "category": trait.split("/")[0], "name": trait.split("/")[1]}


def overview(data: DashboardFiles, p: Params) -> dict[str, Any]:
    exp = data.experiment(p.text("exp"))
    extraction = [{**_names(trait), "variant": variant,
                   "vector_lens": data.child(folder, "logit_lens.json",
                                             is_dir=False) is not None,
                   "completions": data.child(folder, "completions.json",
                                             is_dir=False) is not None}
                  for trait, variant, folder in extraction_entries(data, exp)]
    steering = [{**_names(trait), "variant": variant,
                 "n_rows": len(steering_rows(data, exp, trait, variant) or [])}
                for trait, variant in steering_runs(data, exp)]
    variants = list(exp.config.model_variants)
    calibration = [v for v in variants if data.calibration_file(exp, v) is not None]
    diffs = diff_index(data, exp)
    runs = noising.noising_runs(data, p)
    app, extract = exp.variant(None)[0], exp.variant(None, "extraction")[0]
    hints = {}
    if not extraction:
        hints["trait vectors"] = cmd("extract", exp.name, traits="CATEGORY/NAME",
                                     model_variant=extract)
    if not steering:
        hints["steering"] = cmd("steer", exp.name, trait="CATEGORY/NAME", model_variant=app)
    for variant in variants:
        if variant not in calibration:
            hints[f"calibration of {variant}"] = cmd("calibrate", exp.name,
                                                     model_variant=variant)
    if len(variants) > 1 and not diffs:
        hints["model diff"] = cmd("diff run", exp.name, variant_a=variants[0],
                                  variant_b=variants[1], prompt_set="PROMPT_SET")
    if runs["hint"]:
        hints["noising"] = runs["hint"]
    return {"exp": exp.name, "extraction": extraction, "steering": steering,
            "calibration": calibration, "diffs": diffs,
            "noising": {"available": runs["available"], "runs": len(runs["runs"])},
            "hints": hints}


def export_keys(data: DashboardFiles, name: str) -> Iterator[tuple[str, dict[str, str]]]:
    yield "overview", {"exp": name}


HANDLERS = {"overview": overview}
