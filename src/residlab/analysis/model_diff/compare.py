"""Compare two variants on identical tokens: diff vectors, cosines with trait vectors, effect
sizes of the trait projections.

Each prompt is summarised, at each layer, by its mean activation over RESPONSE tokens. Then:

- ``diff_vectors.safetensors``: per layer, the mean over prompts of ``mean_B - mean_A``;
- per trait and layer with a vector ``v``: the cosine of the diff vector with ``v``; the
  projections ``mean_x . v/|v|`` of each prompt under each variant, their unpaired Cohen's d
  ``(muB - muA) / sqrt((sdB^2 + sdA^2) / 2)`` (unbiased sds), paired d
  ``mean(B_i - A_i) / std(B_i - A_i)`` (population std), and each variant's population sd;
  the peak layer by ``|d|``. A statistic whose denominator is zero is ``null``.

Every per-layer list of a trait is aligned with its ``layers`` (``null`` where the trait has no
vector). Activations come from the component the trait's vector was extracted on (``component``
when its vectors exist on several). Captures are streamed: one prompt's per-layer means at a
time, one ``(T, D)`` tensor read at a time; only running sums and per-prompt scalars are kept.

```
experiments/{exp}/model_diff/{A}_vs_{B}/{prompt_set}/
  diff_vectors.safetensors   "layer{L}" (d,) float32 for ``component``; "{other}.layer{L}" for
                             other components a trait's vector needed
  results.json               experiment, variant_a, variant_b, prompt_set, component,
                             n_prompts, traits.{trait}: {method, position, layers, per_layer_*,
                             peak_layer, peak_effect_size, peak_paired_effect_size}
```
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from residlab.analysis.model_diff import diff_dir
from residlab.analysis.model_diff.pairs import Pair, captured_layers, paired_captures
from residlab.arch import normalize_layer
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment, load_experiment
from residlab.inference.project import traits_with_vectors
from residlab.inference.raw import read_parts
from residlab.progress import progress
from residlab.store import atomic_path, write_json
from residlab.traits.select import select_vectors
from residlab.traits.vectors import TraitVector, find_vectors, load_vector

__all__ = ["DiffFitter", "DiffResult", "compare_variants", "layer_stats", "results_dir"]

log = logging.getLogger(__name__)
COMPONENTS = ("residual", "attn_contribution", "mlp_contribution")
Site = tuple[str, int]  # (component, layer)


def results_dir(experiment: Experiment, variant_a: str, variant_b: str, prompt_set: str) -> Path:
    """``model_diff/{A}_vs_{B}/{prompt_set}``: where compare writes."""
    return diff_dir(experiment, variant_a, variant_b) / prompt_set


# --- statistics -----------------------------------------------------------------------------

def _ratio(numerator: float, denominator: float, scale: float) -> float | None:
    """``numerator / denominator``, ``None`` when the denominator is zero (up to rounding of
    values of size ``scale``): an effect size over no spread is undefined."""
    if not denominator > 1e-12 * max(scale, 1.0):
        return None
    return float(numerator / denominator)


def layer_stats(proj_a: np.ndarray, proj_b: np.ndarray) -> dict[str, float | None]:
    """Effect sizes of one trait at one layer from each prompt's projections ``(n,)`` under A
    and B (prompt i of both is the same text)."""
    proj_a, proj_b = np.asarray(proj_a, np.float64), np.asarray(proj_b, np.float64)
    scale = float(np.abs(np.concatenate([proj_a, proj_b])).max(initial=0.0))
    pooled = (np.sqrt((proj_b.var(ddof=1) + proj_a.var(ddof=1)) / 2) if len(proj_a) > 1
              else 0.0)
    diffs = proj_b - proj_a  # (n,)
    return {
        "effect_size": _ratio(proj_b.mean() - proj_a.mean(), pooled, scale),
        "paired_effect_size": _ratio(diffs.mean(), diffs.std(), scale),
        "mean_a": float(proj_a.mean()), "mean_b": float(proj_b.mean()),
        "std_a": float(proj_a.std()), "std_b": float(proj_b.std()),
    }


def _cosine(diff: torch.Tensor, vector: torch.Tensor) -> float | None:
    """Cosine of the diff vector with a trait vector; ``None`` for a zero diff."""
    norms = float(diff.norm() * vector.double().norm())
    return _ratio(float(diff @ vector.double()), norms, 0.0)


# --- streaming fitter -----------------------------------------------------------------------

@dataclass(frozen=True)
class DiffResult:
    """What the fitter saw: ``n`` prompts, per site the mean of ``mean_B - mean_A`` ``(d,)``
    (float64) and per site each prompt's projections on that site's units ``(n, t)``."""

    n: int
    diff_vectors: dict[Site, torch.Tensor]
    proj_a: dict[Site, np.ndarray]
    proj_b: dict[Site, np.ndarray]


@dataclass
class DiffFitter:
    """Accumulates over prompts: running sums of ``mean_B - mean_A`` per site and the
    projections of both means on the site's unit vectors ``(t, d)``."""

    units: dict[Site, torch.Tensor]  # site -> (t, d) float64 unit vectors (t may be 0)
    n: int = 0
    sums: dict[Site, torch.Tensor] = field(default_factory=dict)
    proj: dict[Site, tuple[list, list]] = field(default_factory=dict)

    def update(self, means: dict[Site, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One prompt: per site its response means ``(d,)`` under A and B."""
        for site, (mean_a, mean_b) in means.items():
            diff = mean_b - mean_a  # (d,)
            self.sums[site] = self.sums[site] + diff if site in self.sums else diff.clone()
            units = self.units[site]  # (t, d)
            if units.shape[0] and units.shape[1] != diff.shape[0]:
                raise UsageError(f"the trait vectors at {site[0]} layer {site[1]} have size "
                                 f"{units.shape[1]} but the captures have {diff.shape[0]}; "
                                 "use vectors extracted with this model")
            lists = self.proj.setdefault(site, ([], []))
            for i, mean in enumerate((mean_a, mean_b)):
                lists[i].append((units @ mean).numpy() if units.shape[0] else np.zeros(0))
        self.n += 1

    def result(self) -> DiffResult:
        def stacked(i: int) -> dict[Site, np.ndarray]:
            return {site: np.stack(lists[i]) for site, lists in self.proj.items()}  # (n, t)

        return DiffResult(self.n, {s: total / self.n for s, total in self.sums.items()},
                          stacked(0), stacked(1))


def _response(path: Path, layer: int, component: str) -> torch.Tensor | None:
    """The response tokens' activations ``(T, d)`` at one site (``None``: no response)."""
    hidden = read_parts(path, layer, component)[1].get("response")
    return hidden if hidden is not None and hidden.shape[0] else None


def _prompt_means(pair: Pair, sites: Sequence[Site]):
    """Per site, the mean over response tokens under A and under B ``(d,)`` float64; ``None``
    when the prompt has no response tokens. One ``(T, d)`` tensor is held at a time."""
    means = {}
    for component, layer in sites:
        a = _response(pair.path_a, layer, component)
        b = _response(pair.path_b, layer, component)
        if a is None or b is None:
            return None
        if a.shape != b.shape:
            raise UsageError(f"prompt {pair.prompt_id}: {component} at layer {layer} has shape "
                             f"{tuple(a.shape)} under one variant and {tuple(b.shape)} under "
                             "the other; compare variants of the same model size")
        means[(component, layer)] = (a.double().mean(0), b.double().mean(0))  # (d,) each
    return means


# --- vector choice --------------------------------------------------------------------------

@dataclass(frozen=True)
class _TraitPlan:
    """One trait: the vectors of one method and position, at the layers compared."""

    trait: str
    component: str
    method: str
    position: str
    reason: str
    layers: list[int]  # every per-layer list is aligned with these
    vectors: dict[int, TraitVector]  # layer -> vector, for the layers that have one


@dataclass(frozen=True)
class _Request:
    """Where vectors come from and which ones are asked for."""

    experiment: Experiment  # the vectors' experiment
    variant: str  # the vectors' variant
    component: str
    method: str | None
    position: str | None
    requested: bool  # layers were named by the caller (a missing vector is then an error)


def _trait_component(request: _Request, trait: str) -> str:
    """The component the trait's vectors were extracted on; ``request.component`` when they
    exist on several (or on none: the error then comes from the selection)."""
    have = [c for c in COMPONENTS
            if find_vectors(request.experiment, trait, request.variant, component=c,
                            position=request.position, method=request.method)]
    return have[0] if len(have) == 1 else request.component


def _plan_trait(request: _Request, trait: str, layers_of) -> _TraitPlan:
    """The best vector's method and position (steering results, else held-out effect size),
    then that method and position's vector at each compared layer (``layers_of(component)``).
    """
    component = _trait_component(request, trait)
    layers = layers_of(component)
    steer_variant, _ = request.experiment.variant(None)
    (best,) = select_vectors(request.experiment, trait, variant=request.variant,
                             method=request.method, position=request.position,
                             component=component, available_layers=layers,
                             steer_variant=steer_variant)
    method, position = best.vector.method, best.vector.position
    stored = {s.layer: s for s in find_vectors(request.experiment, trait, request.variant,
                                               position=position, component=component,
                                               method=method)}
    missing = [layer for layer in layers if layer not in stored]
    if (request.requested and missing) or len(missing) == len(layers):
        raise NotFound(
            f"{trait} has no {method} vector ({position}, {component}, variant "
            f"{request.variant}) at layer(s) {missing}; it has layers {sorted(stored)}: "
            "compare those layers (capture them if needed) or extract the missing ones")
    vectors = {layer: load_vector(stored[layer].path) for layer in layers if layer in stored}
    reason = best.reason if request.method is None else "method and position as requested"
    log.info("%s: %s %s vectors on %s (%s)", trait, method, position, component, reason)
    return _TraitPlan(trait, component, method, position, reason, layers, vectors)


# --- the command ----------------------------------------------------------------------------

def _vector_source(experiment: Experiment, vector_experiment: str | Experiment | None,
                   vector_variant: str | None) -> tuple[Experiment, str]:
    """The experiment holding the vectors (default: this one) and its extraction variant."""
    if vector_experiment is None:
        source = experiment
    elif isinstance(vector_experiment, Experiment):
        source = vector_experiment
    else:
        source = load_experiment(vector_experiment, experiment.path.parent)
    variant, _ = source.variant(vector_variant, role="extraction")
    return source, variant


def _requested_layers(layers: Sequence[int] | None, pairs: Sequence[Pair]) -> list[int] | None:
    """Requested layers as indices; negative ones count from the end (the captures record
    the model's layer count)."""
    if layers is None:
        return None
    counts = {p.held_a.n_layers for p in pairs} | {p.held_b.n_layers for p in pairs}
    n_layers = counts.pop() if len(counts) == 1 else None
    if n_layers is not None:
        return sorted({normalize_layer(layer, n_layers) for layer in layers})
    if any(layer < 0 for layer in layers):
        raise UsageError("negative layers count from the end, but the captures do not record "
                         "the model's layer count; give layers >= 0")
    return sorted(set(layers))


def _sites(component: str, plans: Sequence[_TraitPlan], layers: list[int]):
    """Every site read, with the unit vectors ``(t, d)`` projected there, and the row of each
    (trait, site) among them."""
    rows: dict[Site, list[torch.Tensor]] = {(component, layer): [] for layer in layers}
    index: dict[tuple[str, Site], int] = {}
    for plan in plans:
        for layer in plan.layers:
            units = rows.setdefault((plan.component, layer), [])
            if layer in plan.vectors:
                index[(plan.trait, (plan.component, layer))] = len(units)
                units.append(plan.vectors[layer].unit.double())
    units = {site: torch.stack(vs) if vs else torch.zeros(0, 0, dtype=torch.float64)
             for site, vs in rows.items()}
    return units, index


def _fit(pairs: Sequence[Pair], units: dict[Site, torch.Tensor]) -> tuple[DiffResult, list[str]]:
    """Streams every pair through the fitter; prompts without response tokens are left out."""
    fitter, used = DiffFitter(units), []
    sites = list(units)
    with progress(total=len(pairs), desc="comparing", unit="prompts") as bar:
        for pair in pairs:
            means = _prompt_means(pair, sites)
            if means is None:
                log.warning("prompt %s has no response tokens; left out", pair.prompt_id)
            else:
                fitter.update(means)
                used.append(pair.prompt_id)
            bar.update(1)
    if not used:
        raise UsageError("no paired prompt has response tokens; generate responses first")
    return fitter.result(), used


def _trait_result(plan: _TraitPlan, result: DiffResult,
                  index: dict[tuple[str, Site], int]) -> dict:
    """The seed's per-trait record; every list aligned with ``plan.layers``."""
    columns: dict[str, list] = {name: [] for name in (
        "cosine_sim", "effect_size", "paired_effect_size", "mean_a", "mean_b", "std_a",
        "std_b")}
    for layer in plan.layers:
        site = (plan.component, layer)
        row = index.get((plan.trait, site))
        if row is None:  # no vector here: null in every list, never a shifted list
            for values in columns.values():
                values.append(None)
            continue
        stats = layer_stats(result.proj_a[site][:, row], result.proj_b[site][:, row])
        stats["cosine_sim"] = _cosine(result.diff_vectors[site], plan.vectors[layer].vector)
        for name, values in columns.items():
            values.append(stats[name])
    return {"method": plan.method, "position": plan.position, "component": plan.component,
            "selection": plan.reason, "layers": plan.layers,
            **{f"per_layer_{name}": values for name, values in columns.items()},
            **_peak(plan.layers, columns)}


def _peak(layers: list[int], columns: dict[str, list]) -> dict:
    """The layer of largest ``|d|`` (the first one on ties) and its two effect sizes."""
    defined = [i for i, d in enumerate(columns["effect_size"]) if d is not None]
    if not defined:
        return {"peak_layer": None, "peak_effect_size": None, "peak_paired_effect_size": None}
    top = max(defined, key=lambda i: (abs(columns["effect_size"][i]), -i))
    return {"peak_layer": layers[top], "peak_effect_size": columns["effect_size"][top],
            "peak_paired_effect_size": columns["paired_effect_size"][top]}


def _write_diff_vectors(folder: Path, result: DiffResult, header: dict) -> Path:
    """``layer{L}`` for the header's component, ``{other}.layer{L}`` for other components,
    float32 ``(d,)`` each; the header (with the layers of each component) as metadata."""
    from safetensors.torch import save_file

    main = header["component"]
    tensors = {(f"layer{layer}" if comp == main else f"{comp}.layer{layer}"):
               diff.float().contiguous() for (comp, layer), diff in result.diff_vectors.items()}
    layers = {comp: sorted(layer for c, layer in result.diff_vectors if c == comp)
              for comp in {c for c, _ in result.diff_vectors}}
    meta = {**header, "variants": [header["variant_a"], header["variant_b"]],
            "layers": layers[main], "layers_by_component": layers}
    path = folder / "diff_vectors.safetensors"
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata={"residlab": json.dumps(meta)})
    return path


def _basis(pairs: Sequence[Pair], used: list[str], source: tuple[Experiment, str]) -> str:
    """Digest of what a results file was computed from (prompts, their tokens, vectors'
    experiment and variant): traits of an older file are kept only when it matches."""
    held = {p.prompt_id: p.held_a.token_sha for p in pairs}
    text = json.dumps([[pid, held[pid]] for pid in used] + [source[0].name, source[1]])
    return hashlib.sha256(text.encode()).hexdigest()


def _merged_traits(path: Path, header: dict) -> dict:
    """Traits of an existing ``results.json`` of the same basis and component (a run for
    some traits keeps the others), else none."""
    try:
        old = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    same = all(old.get(key) == header[key] for key in ("basis_sha256", "component"))
    return dict(old.get("traits") or {}) if same else {}


def _write_results(path: Path, header: dict, plans: Sequence[_TraitPlan], result: DiffResult,
                   index: dict[tuple[str, Site], int]) -> Path:
    """``results.json``; traits of an older file of the same basis are kept."""
    traits = _merged_traits(path, header)
    for plan in plans:
        record = traits[plan.trait] = _trait_result(plan, result, index)
        log.info("%s: peak layer %s, d=%s (paired %s)", plan.trait, record["peak_layer"],
                 _fmt(record["peak_effect_size"]), _fmt(record["peak_paired_effect_size"]))
    write_json(path, {**header, "traits": dict(sorted(traits.items()))})
    return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def _layer_finder(pairs: Sequence[Pair], wanted: list[int] | None, names: tuple[str, str]):
    """``component -> layers compared`` (checked once per component)."""
    cache: dict[str, list[int]] = {}

    def layers_of(component: str) -> list[int]:
        if component not in cache:
            cache[component] = captured_layers(pairs, component, names=names, wanted=wanted)
        return cache[component]

    return layers_of


def compare_variants(
    experiment: Experiment, variant_a: str, variant_b: str, prompt_set: str, *,
    traits: Sequence[str] | None = None, component: str = "residual", method: str | None = None,
    position: str | None = None, vector_experiment: str | Experiment | None = None,
    vector_variant: str | None = None, layers: Sequence[int] | None = None,
) -> Path:
    """Write ``diff_vectors.safetensors`` and ``results.json`` for A vs B on ``prompt_set``;
    returns the results file.

    ``method`` / ``position`` fix the vectors' method and position at every layer; left out,
    the best vector's are used (steering results of the vectors' experiment's application
    variant, else held-out effect size). ``layers`` limits the comparison to those layers
    (negative ones count from the end; each trait must have a vector at each); by default
    every layer both variants captured is compared, ``null`` where a trait has no vector.
    ``vector_experiment`` / ``vector_variant``: where the vectors come from (default: this
    experiment, its ``defaults.extraction``). Nothing is written unless every check passes."""
    if component not in COMPONENTS:
        raise UsageError(f"unknown component {component!r}; use one of {', '.join(COMPONENTS)}")
    pairs = paired_captures(experiment, variant_a, variant_b, prompt_set)
    source = _vector_source(experiment, vector_experiment, vector_variant)
    wanted = _requested_layers(layers, pairs)
    request = _Request(*source, component, method, position, wanted is not None)
    layers_of = _layer_finder(pairs, wanted, (variant_a, variant_b))
    names = list(traits) if traits else traits_with_vectors(*source)
    if not names:
        log.warning("no extracted trait vectors for variant %s of experiment %s: writing diff "
                    "vectors only", source[1], source[0].name)
    plans = [_plan_trait(request, trait, layers_of) for trait in names]
    units, index = _sites(component, plans, layers_of(component))
    result, used = _fit(pairs, units)
    header = {"experiment": experiment.name, "variant_a": variant_a, "variant_b": variant_b,
              "prompt_set": prompt_set, "component": component, "n_prompts": result.n,
              "prompt_ids": used, "vector_experiment": source[0].name,
              "vector_variant": source[1], "basis_sha256": _basis(pairs, used, source)}
    folder = results_dir(experiment, variant_a, variant_b, prompt_set)
    _write_diff_vectors(folder, result, header)
    return _write_results(folder / "results.json", header, plans, result, index)
