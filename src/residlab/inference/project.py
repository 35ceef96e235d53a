"""Project captured activations onto trait vectors, token by token.

For each captured prompt and trait: ``h . v / |v|`` per token (``projections``), the token
norms (``norms``) and cosines, so a viewer can show raw, cosine and norm-normalised forms.
``--centered`` subtracts the vector's baseline (the projection of the midpoint of the two class
means). With calibration (the default) each token's values on the layer's massive dimensions
are embedded; ``--clean-massive-dims`` adds projections and norms with those dims removed.
Each file is read once for all traits, and only the tensors needed are read.

Layout: one file per (trait, prompt), ``projections/{trait}/{prompt_set}[_{suffix}]/{id}.json``
as in the seed. A request for several layers (``--layer 10,20``) puts each layer in a folder of
its own, ``{prompt_set}[_{suffix}]_L{layer}``, named by the layer asked for (``-1`` resolved);
a snap to another stored layer is recorded in the file.

Every file records what made it: ``metadata.settings`` holds the vector (trait, variant,
method, position, component, layer, sha256 of its values), ``centered`` and the baseline used,
``clean_massive_dims`` and the massive dims embedded (``None`` without calibration), and
``metadata.capture_token_sha256`` the token hash of the capture it was computed from. A folder
holds the projections of one setting (equal ``metadata.settings``): projecting into a folder
that holds other settings is refused, naming ``--output-suffix``. With ``skip_existing`` a file
is kept when its settings and capture token hash match; the others are made again, each logged
with the reason (files of other settings whose capture is gone are still refused).

    python -m residlab.inference.project_raw_activations_onto_traits --experiment E --prompt-set S
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson
import torch

from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.inference.calibrate import calibration_path
from residlab.inference.raw import Contents, contents, read_parts
from residlab.outputs import (
    UNRECORDED,
    Existing,
    differing_setting,
    keep_or_refuse,
    tensor_sha256,
)
from residlab.progress import progress
from residlab.store import write_json
from residlab.traits.select import Choice, select_vectors

__all__ = ["project_prompt_set", "project_tensor", "projection_dir", "traits_with_vectors"]

log = logging.getLogger(__name__)


def projection_dir(experiment: Experiment, variant: str, trait: str, prompt_set: str) -> Path:
    """``projections/{trait}/{prompt_set}``; ``prompt_set`` may carry a suffix or layer."""
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


class _Target(NamedTuple):
    """One vector to project on, the folder its files go to and the settings they record."""

    trait: str
    choice: Choice
    folder: str  # projections/{trait}/{folder}/
    settings: dict[str, Any]


def _choose(experiment, traits, extraction_variant, captured, options) -> dict[str, list[Choice]]:
    """Per trait, one vector per layer asked for (``best`` forms give one)."""
    choices: dict[str, list[Choice]] = {}
    for trait in traits:
        found = select_vectors(experiment, trait, variant=extraction_variant,
                               layer=options["layer"], method=options["method"],
                               position=options["position"], component=options["component"],
                               available_layers=captured, steer_variant=options["variant"],
                               n_layers=options["n_layers"])
        unique = list({choice.requested_layer: choice for choice in found}.values())
        for choice in unique:
            log.info("%s: %s", trait, choice.reason)
        choices[trait] = unique
    return choices


def _check_calibration(choices: dict[str, list[Choice]], calib: dict | None) -> None:
    """Before anything is read or written: the calibration covers every layer projected at."""
    layers = sorted({c.vector.layer for chosen in choices.values() for c in chosen})
    missing = [layer for layer in layers if calib and str(layer) not in calib["layers"]]
    if missing:
        raise UsageError(f"the calibration has no layer(s) {missing}; rerun 'residlab "
                         "calibrate' for this variant or pass --no-calibration")


def _settings(choice: Choice, calib: dict | None, centered: bool, clean: bool) -> dict:
    """What makes two projection files "the same settings" (as read back from a file)."""
    vector = choice.vector
    settings = {
        "vector": {**vector.source(), "sha256": tensor_sha256(vector.vector)},
        "centered": centered,
        "baseline": float(vector.stats.get("baseline", 0.0)) if centered else 0.0,
        "clean_massive_dims": clean,
        "massive_dims": calib["layers"][str(vector.layer)]["dims"] if calib else None,
    }
    return orjson.loads(orjson.dumps(settings))


def _targets(choices: dict[str, list[Choice]], base: str, calib: dict | None, centered: bool,
             clean: bool) -> list[_Target]:
    """Each (trait, vector): in ``base``, or ``base_L{layer}`` when several layers are asked."""
    return [_Target(trait, choice,
                    base if len(chosen) == 1 else f"{base}_L{choice.requested_layer}",
                    _settings(choice, calib, centered, clean))
            for trait, chosen in choices.items() for choice in chosen]


def _examine(path: Path, target: _Target, token_sha: str | None) -> Existing:
    """How an existing projection file compares with what this run would write."""
    try:
        metadata = orjson.loads(path.read_bytes())["metadata"]
        recorded = metadata.get("settings")
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return Existing("stale", "it is not a readable projection file")
    if not isinstance(recorded, dict):
        return Existing("settings", "unrecorded settings (an older file)", "recorded settings")
    differs = differing_setting(recorded, target.settings)
    if differs:
        return Existing("settings", *differs)
    if metadata.get("capture_token_sha256", UNRECORDED) != token_sha:
        return Existing("stale", "its capture holds other token ids now (it was captured "
                                 "again)")
    return Existing("same")


def _plan(experiment, variant, files: Sequence[Path], held: Sequence[Contents],
          targets: list[_Target], skip_existing: bool) -> list[tuple]:
    """Per capture file: ``{layer: [targets]}`` still to project (files with nothing to do
    are dropped). Refuses before anything is written when a folder holds other settings."""
    token_shas = {path.stem: h.token_sha for path, h in zip(files, held, strict=True)}
    keep = []
    for target in targets:
        folder = projection_dir(experiment, variant, target.trait, target.folder)
        paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
        found = {p.stem: _examine(p, target, token_shas.get(p.stem)) for p in paths}
        keep.append(keep_or_refuse(folder, found, token_shas, skip_existing, "projections"))
    plan = []
    for path in files:
        by_layer: dict[int, list[_Target]] = {}
        for target, kept in zip(targets, keep, strict=True):
            if path.stem not in kept:
                by_layer.setdefault(target.choice.vector.layer, []).append(target)
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


def _check_sizes(plan, targets: list[_Target], component: str) -> None:
    """Before any file is written: the vectors have the captures' hidden size (read from one
    tensor of the first file)."""
    if not plan:
        return
    path, by_layer = plan[0]
    hidden = next(iter(read_parts(path, next(iter(by_layer)), component)[1].values()))
    for target in targets:
        size = target.choice.vector.vector.shape[0]
        if size != hidden.shape[-1]:
            raise UsageError(f"the {target.trait} vector has size {size} but {path} has "
                             f"{hidden.shape[-1]}; use vectors extracted with this model")


class _Run(NamedTuple):
    experiment: Experiment
    variant: str
    prompt_set: str
    component: str


def project_prompt_set(
    experiment: Experiment, prompt_set: str, *, variant: str | None = None,
    traits: Sequence[str] | None = None, layer: str | int | None = "best",
    method: str | None = None, component: str = "residual", position: str | None = None,
    extraction_variant: str | None = None, skip_existing: bool = False,
    calibration: bool = True, centered: bool = False, clean_massive_dims: bool = False,
    output_suffix: str | None = None,
) -> list[Path]:
    """Write projection JSONs for every captured prompt; returns the files written.

    ``layer`` may count from the end (``-1``) when the captures record the model's layer
    count, and may list several layers (``"10,20"``: one folder per layer). ``output_suffix``
    writes to ``{prompt_set}_{suffix}``. Nothing is written unless every capture holds the
    chosen layers and component and no folder holds projections of other settings."""
    variant_name, _ = experiment.variant(variant)
    source, _ = experiment.variant(extraction_variant, role="extraction")
    files, held = _captures(experiment, variant_name, prompt_set)
    traits = list(traits) if traits else traits_with_vectors(experiment, source)
    if not traits:
        raise NotFound(f"no extracted trait vectors for variant {source}; run 'residlab "
                       "extract' first")
    calib = _calibration(experiment, variant_name, calibration or clean_massive_dims)
    options = {"layer": layer, "method": method, "position": position, "component": component,
               "n_layers": _model_layers(held), "variant": variant_name}
    choices = _choose(experiment, traits, source, _captured_layers(held, component), options)
    _check_calibration(choices, calib)
    base = f"{prompt_set}_{output_suffix}" if output_suffix else prompt_set
    targets = _targets(choices, base, calib, centered, clean_massive_dims)
    plan = _plan(experiment, variant_name, files, held, targets, skip_existing)
    by_file = dict(zip(files, held, strict=True))
    _check_captures(plan, by_file, component,
                    f"residlab capture --experiment {experiment.name} --prompt-set "
                    f"{prompt_set} --model-variant {variant_name}")
    _check_sizes(plan, targets, component)
    run = _Run(experiment, variant_name, prompt_set, component)
    written: list[Path] = []
    with progress(total=len(files), desc="projecting", unit="files",
                  initial=len(files) - len(plan)) as bar:
        for path, by_layer in plan:
            written += _project_file(run, path, by_layer, by_file[path].token_sha)
            bar.update(1)
    return written


def _captures(experiment, variant: str, prompt_set: str) -> tuple[list[Path], list[Contents]]:
    raw_dir = experiment.raw_dir(variant, prompt_set)
    files = sorted(raw_dir.glob("*.safetensors")) + sorted(raw_dir.glob("*.pt"))
    if not files:
        raise NotFound(f"no captures in {raw_dir}; run 'residlab capture --experiment "
                       f"{experiment.name} --prompt-set {prompt_set}' first")
    return files, _holdings(files)


def _project_file(run: _Run, path: Path, by_layer: dict[int, list[_Target]],
                  token_sha: str | None) -> list[Path]:
    """One capture file: each layer's tensors are read once, for all its vectors."""
    written = []
    for layer_index, targets in by_layer.items():
        parts = read_parts(path, layer_index, run.component)[1]
        massive = targets[0].settings["massive_dims"] or []  # the layer's, same for all
        units = torch.stack([t.choice.vector.unit for t in targets])  # (t, d)
        for hidden in parts.values():
            if hidden.shape[-1] != units.shape[1]:
                raise UsageError(f"the vectors have size {units.shape[1]} but {path} has "
                                 f"{hidden.shape[-1]}; use vectors of this model")
        baselines = [t.settings["baseline"] for t in targets]
        projected = {part: project_many(hidden, units, baselines, massive)
                     for part, hidden in parts.items()}
        for i, target in enumerate(targets):
            results = {part: values[i] for part, values in projected.items()}
            written.append(_write(run, path.stem, target, results, massive, token_sha))
    return written


def _write(run: _Run, prompt_id: str, target: _Target, results, massive,
           token_sha: str | None) -> Path:
    choice, settings = target.choice, target.settings
    record = {
        "metadata": {"prompt_id": prompt_id, "prompt_set": run.prompt_set,
                     "vector_source": {"experiment": run.experiment.name,
                                       **choice.vector.source(),
                                       "sha256": settings["vector"]["sha256"],
                                       "requested_layer": choice.requested_layer,
                                       "selection": choice.reason},
                     "centered": settings["centered"], "baseline": settings["baseline"],
                     "variant": run.variant, "settings": settings,
                     "capture_token_sha256": token_sha},
        "projections": {p: r["projections"] for p, r in results.items()},
        "norms": {p: r["norms"] for p, r in results.items()},
        "cosine": {p: r["cosine"] for p, r in results.items()},
    }
    if massive:
        record["massive_dims"] = {"layer": choice.vector.layer, "dims": massive,
                                  "values": {p: r["massive_values"] for p, r in results.items()}}
        if settings["clean_massive_dims"]:
            record["clean"] = {p: r["clean"] for p, r in results.items()}
    folder = projection_dir(run.experiment, run.variant, target.trait, target.folder)
    path = folder / f"{prompt_id}.json"
    write_json(path, record, compact=True)
    return path
