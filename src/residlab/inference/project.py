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

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.inference.calibrate import calibration_path
from residlab.inference.raw import Contents, contents, read_parts
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


def project_many(hidden: torch.Tensor, units: torch.Tensor, baselines: Sequence[float],
                 massive: Sequence[int] = ()) -> list[dict[str, np.ndarray | dict]]:
    """Per-token projection, norm and cosine of ``hidden`` ``(n, d)`` on each row of
    ``units`` ``(t, d)``, sharing the trait-independent work (norms, massive dims).
    Float32 numpy arrays, ready for JSON."""
    h = hidden.float().numpy()  # (n, d); numpy: these arrays are small, torch overhead is not
    u = units.float().numpy()  # (t, d)
    proj = u @ h.T  # (t, n): rows stay contiguous for JSON
    norms = np.sqrt(np.einsum("nd,nd->n", h, h))  # (n,)
    cosine = proj / np.maximum(norms, 1e-12)[None, :]  # (t, n)
    if massive:
        dims = list(massive)
        values = np.ascontiguousarray(h[:, dims])  # (n, k)
        share = u[:, dims] @ values.T  # (t, n): the massive dims' part of h . v
        clean_norms = np.sqrt(np.maximum(norms**2 - (values**2).sum(-1), 0))
    out = []
    for i, baseline in enumerate(baselines):
        result: dict = {"projections": proj[i] - np.float32(baseline), "norms": norms,
                        "cosine": cosine[i]}
        if massive:
            result["clean"] = {"projections": proj[i] - share[i] - np.float32(baseline),
                               "norms": clean_norms}
            result["massive_values"] = values
        out.append(result)
    return out


def project_tensor(hidden: torch.Tensor, unit: torch.Tensor, baseline: float = 0.0,
                   massive: Sequence[int] = ()) -> dict[str, np.ndarray | dict]:
    """:func:`project_many` for one unit vector ``(d,)``."""
    return project_many(hidden, unit[None, :], [baseline], massive)[0]


def _calibration(experiment: Experiment, variant: str, use: bool) -> dict | None:
    if not use:
        return None
    path = calibration_path(experiment, variant)
    if not path.is_file():
        raise NotFound(f"calibration missing ({path}); make it with 'residlab calibrate "
                          f"--experiment {experiment.name} --model-variant {variant}' or pass "
                          "--no-calibration")
    import orjson

    return orjson.loads(path.read_bytes())  # large (per-layer means): the fast parser


def _holdings(files: Sequence[Path]) -> list[Contents]:
    """What each capture holds, from headers only (legacy ``.pt`` files are loaded)."""
    held = []
    for path in files:
        found = contents(path)
        if found is None:
            raise UsageError(f"{path} is corrupted or truncated; rerun capture with "
                             "--skip-existing to redo it")
        held.append(found)
    return held


def _model_layers(held: Sequence[Contents]) -> int | None:
    """The model's layer count as the captures record it (``None``: unknown or mixed)."""
    counts = {h.n_layers for h in held}
    return counts.pop() if len(counts) == 1 else None


def _captured_layers(held: Sequence[Contents], component: str) -> list[int]:
    """Layers at which every capture holds ``component``."""
    per_file = [{layer for layer, comp in h.pairs if comp == component} for h in held]
    return sorted(set.intersection(*per_file)) if per_file else []


def _choose(experiment, traits, variant, extraction_variant, captured, options) -> dict:
    choices: dict[str, Choice] = {}
    for trait in traits:
        (choice,) = select_vectors(experiment, trait, variant=extraction_variant,
                                   layer=options["layer"], method=options["method"],
                                   position=options["position"],
                                   component=options["component"], available_layers=captured,
                                   steer_variant=variant, n_layers=options["n_layers"])
        log.info("%s: %s", trait, choice.reason)
        choices[trait] = choice
    return choices


def _plan(experiment, variant, prompt_set, files, choices, skip_existing) -> list[tuple]:
    """Per capture file: ``{layer: [traits]}`` still to project (empty files are dropped)."""
    plan = []
    for path in files:
        by_layer: dict[int, list[str]] = {}
        for trait, choice in choices.items():
            target = projection_dir(experiment, variant, trait, prompt_set) / f"{path.stem}.json"
            if not (skip_existing and target.is_file()):
                by_layer.setdefault(choice.vector.layer, []).append(trait)
        if by_layer:
            plan.append((path, by_layer))
    return plan


def _check_captures(plan, held: dict[Path, Contents], component: str, command: str) -> None:
    """Every file must hold every (layer, component) it will be projected at: else nothing is
    written and the message names the file and the capture that would provide it."""
    for path, by_layer in plan:
        have = held[path]
        for layer in sorted(by_layer):
            if (layer, component) in have.pairs:
                continue
            wanted = sorted(set(have.layers) | set(by_layer))
            mlp = " --capture-mlp" if component == "mlp_contribution" else ""
            raise UsageError(
                f"{path} holds no {component} at layer {layer} (it holds layers "
                f"{have.layers or 'none'} of {', '.join(have.components) or 'nothing'}); "
                f"capture it with '{command} --layers {','.join(map(str, wanted))}{mlp}' "
                "or project another layer with --layer")


def _check_sizes_and_calibration(plan, choices: dict[str, Choice], calib: dict | None,
                                 component: str) -> None:
    """Before any file is written: the calibration covers every layer projected at, and the
    vectors have the captures' hidden size (read from one tensor of the first file)."""
    layers = sorted({layer for _, by_layer in plan for layer in by_layer})
    missing = [layer for layer in layers if calib and str(layer) not in calib["layers"]]
    if missing:
        raise UsageError(f"the calibration has no layer(s) {missing}; rerun 'residlab "
                         "calibrate' for this variant or pass --no-calibration")
    if not plan:
        return
    path, by_layer = plan[0]
    hidden = next(iter(read_parts(path, next(iter(by_layer)), component)[1].values()))
    for trait, choice in choices.items():
        size = choice.vector.vector.shape[0]
        if size != hidden.shape[-1]:
            raise UsageError(f"the {trait} vector has size {size} but {path} has "
                             f"{hidden.shape[-1]}; use vectors extracted with this model")


def project_prompt_set(
    experiment: Experiment, prompt_set: str, *, variant: str | None = None,
    traits: Sequence[str] | None = None, layer: str | int | None = "best",
    method: str | None = None, component: str = "residual", position: str | None = None,
    extraction_variant: str | None = None, skip_existing: bool = False,
    calibration: bool = True, centered: bool = False, clean_massive_dims: bool = False,
) -> list[Path]:
    """Write projection JSONs for every captured prompt; returns the files written.

    ``layer`` may count from the end (``-1``) when the captures record the model's layer
    count. Nothing is written unless every capture holds the chosen layers and component."""
    variant_name, _ = experiment.variant(variant)
    source, _ = experiment.variant(extraction_variant, role="extraction")
    raw_dir = experiment.raw_dir(variant_name, prompt_set)
    files = sorted(raw_dir.glob("*.safetensors")) + sorted(raw_dir.glob("*.pt"))
    if not files:
        raise NotFound(f"no captures in {raw_dir}; run 'residlab capture --experiment "
                          f"{experiment.name} --prompt-set {prompt_set}' first")
    traits = list(traits) if traits else traits_with_vectors(experiment, source)
    if not traits:
        raise NotFound(f"no extracted trait vectors for variant {source}; run 'residlab "
                          "extract' first")
    held = _holdings(files)
    calib = _calibration(experiment, variant_name, calibration or clean_massive_dims)
    options = {"layer": layer, "method": method, "position": position, "component": component,
               "n_layers": _model_layers(held)}
    choices = _choose(experiment, traits, variant_name, source,
                      _captured_layers(held, component), options)
    plan = _plan(experiment, variant_name, prompt_set, files, choices, skip_existing)
    _check_captures(plan, dict(zip(files, held, strict=True)), component,
                    f"residlab capture --experiment {experiment.name} --prompt-set "
                    f"{prompt_set} --model-variant {variant_name}")
    _check_sizes_and_calibration(plan, choices, calib, component)
    settings = {"calib": calib, "centered": centered, "clean": clean_massive_dims,
                "component": component}
    written = []
    for path, by_layer in tqdm(plan, desc="projecting", unit="file", disable=None):
        written += _project_file(experiment, variant_name, prompt_set, path, by_layer, choices,
                                 settings)
    return written


def _project_file(experiment, variant, prompt_set, path: Path, by_layer: dict[int, list[str]],
                  choices: dict[str, Choice], settings: dict) -> list[Path]:
    """One capture file: each layer's tensors are read once, for all its traits."""
    calib, centered = settings["calib"], settings["centered"]
    written = []
    for layer_index, names in by_layer.items():
        parts = read_parts(path, layer_index, settings["component"])[1]
        massive = calib["layers"][str(layer_index)]["dims"] if calib else []
        units = torch.stack([choices[t].vector.unit for t in names])  # (t, d)
        for hidden in parts.values():
            if hidden.shape[-1] != units.shape[1]:
                raise UsageError(f"the vectors have size {units.shape[1]} but {path} has "
                                 f"{hidden.shape[-1]}; use vectors of this model")
        baselines = [float(choices[t].vector.stats.get("baseline", 0.0)) if centered
                     else 0.0 for t in names]
        projected = {part: project_many(hidden, units, baselines, massive)
                     for part, hidden in parts.items()}
        for i, trait in enumerate(names):
            results = {part: values[i] for part, values in projected.items()}
            written.append(_write(experiment, variant, prompt_set, path.stem, trait,
                                  choices[trait], results, massive, baselines[i], centered,
                                  settings["clean"]))
    return written


def _write(experiment, variant, prompt_set, prompt_id, trait, choice: Choice, results, massive,
           baseline, centered, clean) -> Path:
    vector = choice.vector
    record = {
        "metadata": {"prompt_id": prompt_id, "prompt_set": prompt_set,
                     "vector_source": {"experiment": experiment.name, **vector.source(),
                                       "requested_layer": choice.requested_layer,
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
