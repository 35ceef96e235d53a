"""Project captured activations onto trait vectors, token by token.

For each captured prompt and trait: ``h . v / |v|`` per token (``projections``), the token
norms (``norms``) and cosines, so a viewer can show raw, cosine and norm-normalised forms.
``--centered`` subtracts the vector's baseline (the projection of the midpoint of the two class
means). With calibration (the default) each token's values on the layer's massive dimensions
are embedded; ``--clean-massive-dims`` adds projections and norms with those dims removed.
Each file is read once for all traits, and only the tensors needed are read.

    python -m residlab.inference.project_raw_activations_onto_traits --experiment E --prompt-set S
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from residlab.experiments import Experiment
from residlab.inference.calibrate import calibration_path
from residlab.inference.raw import read_parts
from residlab.store import write_json
from residlab.traits.select import Choice, select_vectors

__all__ = ["project_prompt_set", "project_tensor", "projection_dir", "traits_with_vectors"]

log = logging.getLogger(__name__)


def projection_dir(experiment: Experiment, variant: str, trait: str, prompt_set: str) -> Path:
    return experiment.inference_dir(variant) / "projections" / trait / prompt_set


def traits_with_vectors(experiment: Experiment, variant: str) -> list[str]:
    root = experiment.path / "extraction"
    return sorted(str(p.parent.parent.relative_to(root))
                  for p in root.glob(f"**/{variant}/vectors") if p.is_dir())


def project_tensor(hidden: torch.Tensor, unit: torch.Tensor, baseline: float = 0.0,
                   massive: Sequence[int] = ()) -> dict[str, list]:
    """Per-token projection, norm and cosine of ``hidden`` ``(n, d)`` on ``unit`` ``(d,)``."""
    h = hidden.float()  # (n, d)
    proj = h @ unit  # (n,)
    norms = h.norm(dim=-1)  # (n,)
    out = {"projections": (proj - baseline).tolist(), "norms": norms.tolist(),
           "cosine": (proj / norms.clamp(min=1e-12)).tolist()}
    if massive:
        dims = torch.tensor(list(massive))
        share = h[:, dims] @ unit[dims]  # (n,) the massive dims' part of h . v
        clean_norms = (norms.square() - h[:, dims].square().sum(-1)).clamp(min=0).sqrt()
        out["clean"] = {"projections": (proj - share - baseline).tolist(),
                        "norms": clean_norms.tolist()}
        out["massive_values"] = h[:, dims].tolist()
    return out


def _calibration(experiment: Experiment, variant: str, use: bool) -> dict | None:
    if not use:
        return None
    path = calibration_path(experiment, variant)
    if not path.is_file():
        raise LookupError(f"calibration missing ({path}); make it with 'residlab calibrate "
                          f"--experiment {experiment.name} --model-variant {variant}' or pass "
                          "--no-calibration")
    return json.loads(path.read_text())


def _captured_layers(raw_dir: Path) -> list[int] | None:
    provenance = raw_dir / "_provenance.json"
    return json.loads(provenance.read_text()).get("layers") if provenance.is_file() else None


def _choose(experiment, traits, variant, extraction_variant, captured, options) -> dict:
    choices: dict[str, Choice] = {}
    for trait in traits:
        (choice,) = select_vectors(experiment, trait, variant=extraction_variant,
                                   layer=options["layer"], method=options["method"],
                                   position=options["position"],
                                   component=options["component"], available_layers=captured,
                                   steer_variant=variant)
        log.info("%s: %s", trait, choice.reason)
        choices[trait] = choice
    return choices


def project_prompt_set(
    experiment: Experiment, prompt_set: str, *, variant: str | None = None,
    traits: Sequence[str] | None = None, layer: str | int | None = "best",
    method: str | None = None, component: str = "residual", position: str | None = None,
    extraction_variant: str | None = None, skip_existing: bool = False,
    calibration: bool = True, centered: bool = False, clean_massive_dims: bool = False,
) -> list[Path]:
    """Write projection JSONs for every captured prompt; returns the files written."""
    variant_name, _ = experiment.variant(variant)
    source, _ = experiment.variant(extraction_variant, role="extraction")
    raw_dir = experiment.raw_dir(variant_name, prompt_set)
    files = sorted(raw_dir.glob("*.safetensors")) + sorted(raw_dir.glob("*.pt"))
    if not files:
        raise LookupError(f"no captures in {raw_dir}; run 'residlab capture --experiment "
                          f"{experiment.name} --prompt-set {prompt_set}' first")
    traits = list(traits) if traits else traits_with_vectors(experiment, source)
    if not traits:
        raise LookupError(f"no extracted trait vectors for variant {source}; run 'residlab "
                          "extract' first")
    calib = _calibration(experiment, variant_name, calibration or clean_massive_dims)
    options = {"layer": layer, "method": method, "position": position, "component": component}
    choices = _choose(experiment, traits, variant_name, source, _captured_layers(raw_dir),
                      options)
    written = []
    for path in tqdm(files, desc="projecting", unit="file", disable=None):
        todo = {t: c for t, c in choices.items() if not (
            skip_existing and (projection_dir(experiment, variant_name, t, prompt_set)
                               / f"{path.stem}.json").is_file())}
        by_layer: dict[int, list[str]] = {}
        for trait, choice in todo.items():
            by_layer.setdefault(choice.vector.layer, []).append(trait)
        for layer_index, names in by_layer.items():
            meta, parts = read_parts(path, layer_index, component)
            massive = calib["layers"][str(layer_index)]["dims"] if calib else []
            for trait in names:
                written.append(_write(experiment, variant_name, prompt_set, path.stem, trait,
                                      choices[trait], parts, massive, centered,
                                      clean_massive_dims))
    return written


def _write(experiment, variant, prompt_set, prompt_id, trait, choice: Choice, parts, massive,
           centered, clean) -> Path:
    vector = choice.vector
    baseline = float(vector.stats.get("baseline", 0.0)) if centered else 0.0
    unit = vector.unit
    if parts and next(iter(parts.values())).shape[-1] != unit.shape[0]:
        raise ValueError(f"vector for {trait} has size {unit.shape[0]} but the captures have "
                         f"{next(iter(parts.values())).shape[-1]}; use vectors of this model")
    results = {part: project_tensor(h, unit, baseline, massive) for part, h in parts.items()}
    record = {
        "metadata": {"prompt_id": prompt_id, "prompt_set": prompt_set,
                     "vector_source": {"experiment": experiment.name, **vector.source(),
                                       "selection": choice.reason},
                     "centered": centered, "baseline": baseline, "variant": variant},
        "projections": {p: r["projections"] for p, r in results.items()},
        "norms": {p: r["norms"] for p, r in results.items()},
        "cosine": {p: r["cosine"] for p, r in results.items()},
    }
    if massive:
        record["massive_dims"] = {"layer": vector.layer, "dims": massive,
                                  "values": {p: r["massive_values"] for p, r in results.items()}}
        if clean:
            record["clean"] = {p: r["clean"] for p, r in results.items()}
    path = projection_dir(experiment, variant, trait, prompt_set) / f"{prompt_id}.json"
    write_json(path, record, compact=True)
    return path
