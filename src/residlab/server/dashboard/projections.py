"""Projection files for the dashboard: parsing, which folder holds which layer, massive-dims
cleaning and the per-token norms. Shared by the Inference endpoints
(:mod:`residlab.server.dashboard.inference`), Top Spans and the export keys; every path
comes from :class:`~residlab.server.dashboard.files.DashboardFiles`'s listings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.server.dashboard.files import (
    LAYER_FOLDER,
    TOP5_MIN_LAYERS,
    DashboardFiles,
    Invalid,
    Where,
    cmd,
    parse_json,
)

__all__ = ["clean_available", "clean_dims", "cleaned", "layer_folders", "norm_file",
           "project_hint", "projection_index", "read_projection", "span_of",
           "top5", "trait_files", "unit_vector"]


# --- parsed files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """One projection file: values over the projected tokens (prompt part first)."""

    path: Path
    source: dict[str, Any]  # metadata.vector_source
    sha256: str | None  # of the vector's values
    centered: bool
    n_prompt: int | None  # projected prompt tokens (None: response-only)
    n_response: int
    proj: np.ndarray  # (n,) float64
    norms: np.ndarray  # (n,) float64
    dims: list[int] | None  # massive dims recorded
    values: np.ndarray | None  # (n, k) float64: the tokens' values on ``dims``

    @property
    def layer(self) -> int:
        return int(self.source["layer"])


def _float_list(value: Any, what: str) -> np.ndarray:
    if not isinstance(value, list):
        raise Invalid(f"{what} is not a list")
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise Invalid(f"{what} holds non-numbers") from None


def _parts(record: dict, key: str) -> tuple[np.ndarray | None, np.ndarray]:
    """``(prompt or None, response)`` of ``record[key]``."""
    block = record.get(key)
    if not isinstance(block, dict):
        raise Invalid(f"no '{key}' object")
    prompt = block.get("prompt")
    prompt = None if prompt is None else _float_list(prompt, f"{key}.prompt")
    return prompt, _float_list(block.get("response"), f"{key}.response")


def _massive(record: dict, n_prompt: int | None, n: int) -> tuple[list[int] | None,
                                                                  np.ndarray | None]:
    block = record.get("massive_dims")
    if block is None:
        return None, None
    dims, values = block.get("dims"), block.get("values")
    if not isinstance(dims, list) or not all(isinstance(d, int) for d in dims) or not (
            isinstance(values, dict)):
        raise Invalid("massive_dims needs 'dims' (whole numbers) and 'values'")
    rows = [] if n_prompt is None else [_float_list(values.get("prompt"), "massive prompt")]
    rows.append(_float_list(values.get("response"), "massive response"))
    rows = [r.reshape(0, len(dims)) if r.size == 0 else r for r in rows]
    stacked = np.concatenate(rows)  # (n, k)
    if stacked.shape != (n, len(dims)):
        raise Invalid(f"massive_dims values have shape {stacked.shape}, expected "
                      f"({n}, {len(dims)})")
    return dims, stacked


def _parse_projection(path: Path, data: bytes) -> Projection:
    record = orjson.loads(data)
    if not isinstance(record, dict):
        raise Invalid("not a JSON object")
    meta = record.get("metadata")
    source = meta.get("vector_source") if isinstance(meta, dict) else None
    if not isinstance(source, dict) or not isinstance(source.get("layer"), int):
        raise Invalid("no metadata.vector_source with a layer")
    prompt, response = _parts(record, "projections")
    norm_prompt, norm_response = _parts(record, "norms")
    if (prompt is None) != (norm_prompt is None) or (
            prompt is not None and prompt.shape != norm_prompt.shape) or (
            response.shape != norm_response.shape):
        raise Invalid("projections and norms have different lengths")
    n_prompt = None if prompt is None else prompt.size
    proj = response if prompt is None else np.concatenate([prompt, response])
    norms = norm_response if prompt is None else np.concatenate([norm_prompt, norm_response])
    dims, values = _massive(record, n_prompt, proj.size)
    settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    sha = (settings.get("vector") or {}).get("sha256") or source.get("sha256")
    return Projection(path, source, sha, bool(meta.get("centered", False)), n_prompt,
                      response.size, proj, norms, dims, values)


# --- projections: which folders -----------------------------------------------------------


def layer_folders(data: DashboardFiles, exp: Experiment, variant: str, trait: str,
                  prompt_set: str) -> tuple[dict[int, Path], int | None]:
    """``({layer: folder}, default layer)`` of a trait's projections of a set. The plain
    folder holds the default layer (the one its files record); ``{set}_L{n}`` folders hold
    the others, and win over the plain folder for their layer (they are one run)."""
    base = data.trait_dir(data.inference(exp, variant, "projections"), trait)
    folders: dict[int, Path] = {}
    default = None
    plain = data.child(base, prompt_set)
    ids = data.ids(plain)
    if ids:
        default = read_projection(data, data.child(plain, f"{ids[0]}.json", is_dir=False),
                                  exp, variant, prompt_set).layer
        folders[default] = plain
    for name in data.dirs(base):
        match = LAYER_FOLDER.fullmatch(name)
        if match and match.group(1) == prompt_set:
            folder = data.child(base, name)
            if data.ids(folder):
                folders[int(match.group(2))] = folder
    if default is None and folders:
        default = min(folders)
    return dict(sorted(folders.items())), default


def projection_index(data: DashboardFiles, exp: Experiment, variant: str) -> dict[str, dict]:
    """``{set: {trait: {layers, default_layer}}}`` of one variant."""
    base = data.inference(exp, variant, "projections")
    out: dict[str, dict] = {}
    for trait in data.traits_under(base):
        names = data.dirs(data.trait_dir(base, trait))
        sets = {LAYER_FOLDER.fullmatch(n).group(1) if LAYER_FOLDER.fullmatch(n) else n
                for n in names}
        for prompt_set in sorted(sets):
            folders, default = layer_folders(data, exp, variant, trait, prompt_set)
            if folders:
                out.setdefault(prompt_set, {})[trait] = {"layers": list(folders),
                                                         "default_layer": default}
    return out


def read_projection(data: DashboardFiles, path: Path, exp: Experiment, variant: str,
                    prompt_set: str) -> Projection:
    try:
        return data.load(path, _parse_projection)
    except Invalid as error:
        command = cmd("project", exp.name, prompt_set=prompt_set, model_variant=variant)
        raise UsageError(f"{path} is not a valid projection file ({error}); make it again "
                         f"with '{command}'") from None


def project_hint(data: DashboardFiles, exp: Experiment, variant: str, prompt_set: str,
                 trait: str | None = None) -> str:
    return cmd("project", exp.name, prompt_set=prompt_set, model_variant=variant,
               traits=trait)


def trait_files(data: DashboardFiles, where: Where, trait: str, prompt_id: str) -> tuple[
        dict[int, Projection], int | None]:
    """``({layer: projection of prompt_id}, default layer)``; NotFound when none."""
    exp, variant, prompt_set = where.exp, where.variant, where.prompt_set
    if data.trait_dir(data.inference(exp, variant, "projections"), trait) is None:
        raise NotFound(f"no projections of trait {trait!r} for {variant} of {exp.name}; "
                       f"run '{project_hint(data, exp, variant, prompt_set, trait)}'")
    folders, default = layer_folders(data, exp, variant, trait, prompt_set)
    files = {}
    for layer, folder in folders.items():
        path = data.child(folder, f"{prompt_id}.json", is_dir=False)
        if path is not None and not prompt_id.startswith("_"):
            files[layer] = read_projection(data, path, exp, variant, prompt_set)
    if not files:
        raise NotFound(f"no projections of {trait} for prompt {prompt_id!r} of "
                       f"{variant}/{prompt_set}; run "
                       f"'{project_hint(data, exp, variant, prompt_set, trait)}'")
    return files, default


# --- cleaning --------------------------------------------------------------------------------


def top5_layers(entries: Iterable[tuple[int, dict]]) -> dict[int, list[int]]:
    """``{dim: the layers whose calibration top 5 has it}`` from ``(layer, entry)`` pairs;
    the massive-dims criterion is ``len(layers) >= TOP5_MIN_LAYERS``."""
    found: dict[int, list[int]] = {}
    for layer, entry in entries:
        for dim in entry["dims"][:5]:
            found.setdefault(int(dim), []).append(layer)
    return found


def top5(data: DashboardFiles, exp: Experiment, variant: str) -> set[int] | None:
    """Dims in the calibration's top 5 at >= 3 layers (``None``: no calibration)."""
    path = data.calibration_file(exp, variant)
    if path is None:
        return None
    try:
        found = top5_layers((int(k), v) for k, v in data.load(path, parse_json)["layers"].items())
    except (Invalid, KeyError, TypeError, AttributeError, ValueError):
        raise UsageError(f"{path} is not a valid calibration file; make it again with "
                         f"'{cmd('calibrate', exp.name, model_variant=variant)}'") from None
    return {dim for dim, layers in found.items() if len(layers) >= TOP5_MIN_LAYERS}


def clean_dims(data: DashboardFiles, where: Where, file: Projection, clean: str) -> list[int]:
    """Positions (into ``file.dims``) of the massive dims removed by ``clean``."""
    if clean == "none":
        return []
    if file.dims is None:
        raise NotFound(f"{file.path} records no massive dims, so clean={clean} is not "
                       "available; make a calibration with "
                       f"'{cmd('calibrate', where.exp.name, model_variant=where.variant)}' "
                       f"and project again with "
                       f"'{project_hint(data, where.exp, where.variant, where.prompt_set)}'")
    if clean == "all":
        return list(range(len(file.dims)))
    dims = top5(data, where.exp, where.variant)
    if dims is None:
        raise NotFound(f"clean=top5 needs the calibration of {where.variant}; make it with "
                       f"'{cmd('calibrate', where.exp.name, model_variant=where.variant)}'")
    return [i for i, dim in enumerate(file.dims) if dim in dims]


def unit_vector(data: DashboardFiles, exp: Experiment, file: Projection) -> np.ndarray | None:
    """The stored vector a projection used, as a unit float64 vector (``None``: gone)."""
    from residlab.outputs import tensor_sha256
    from residlab.traits.positions import position_slug
    from residlab.traits.vectors import load_vector

    source = file.source
    try:
        folder = data.trait_dir(data.child(data.root, exp.name, "extraction"),
                                str(source["trait"]))
        path = data.child(folder, str(source["variant"]), "vectors",
                          position_slug(str(source["position"])), str(source["component"]),
                          str(source["method"]), f"layer{source['layer']}.safetensors",
                          is_dir=False)
    except KeyError:
        return None
    if path is None:
        return None
    stat = path.stat()
    key = ("vector", str(path), stat.st_mtime_ns, stat.st_size)
    found = data.file_cache.get(key)
    if found is None:
        vector = load_vector(path)
        found = (tensor_sha256(vector.vector), vector.unit.double().numpy())
        data.file_cache.put(key, found, stat.st_size)
    sha, unit = found
    if file.sha256 is not None and sha != file.sha256:
        raise UsageError(f"the vector {path} changed since {file.path} was made; project "
                         "again to clean its massive dims")
    return unit


def clean_available(data: DashboardFiles, where: Where, files: Sequence[Projection]) -> list[str]:
    out = ["none"]
    if all(f.dims is not None for f in files) and all(
            unit_vector(data, where.exp, f) is not None for f in files):
        if top5(data, where.exp, where.variant) is not None:
            out.append("top5")
        out.append("all")
    return out


def cleaned(file: Projection, chosen: list[int],
            unit: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(projection, norms)`` with the chosen massive dims' share removed."""
    if not chosen:
        return file.proj, file.norms
    values = file.values[:, chosen]  # (n, s)
    norms = np.sqrt(np.maximum(file.norms**2 - (values**2).sum(-1), 0))  # (n,)
    if unit is None:
        return file.proj, norms
    dims = [file.dims[i] for i in chosen]
    return file.proj - values @ unit[dims], norms  # (n,)


def span_of(data: DashboardFiles, where: Where, prompt_id: str,
            file: Projection) -> tuple[int, int, int]:
    """``(n_tokens, prompt_end, start)`` of a projection file against its response."""
    record = data.record(where, prompt_id, required=False)
    if record is None:
        n_prompt = file.n_prompt or 0
        return n_prompt + file.n_response, n_prompt, 0
    n_tokens, end = len(record["token_ids"]), record["prompt_end"]
    start = end - (file.n_prompt or 0)
    if start < 0 or start + file.proj.size != n_tokens:
        raise UsageError(f"{file.path} holds {file.proj.size} values but the response has "
                         f"{n_tokens} tokens; project again with "
                         f"'{project_hint(data, where.exp, where.variant, where.prompt_set)}'")
    return n_tokens, end, start


def norm_file(data: DashboardFiles, where: Where, prompt_id: str, layer: int) -> Projection:
    """A projection file of ``prompt_id`` at ``layer`` (every trait's hold the same
    norms): the first trait's, preferring one with massive dims."""
    base = data.inference(where.exp, where.variant, "projections")
    found = []
    for trait in data.traits_under(base):
        folder = layer_folders(data, where.exp, where.variant, trait,
                               where.prompt_set)[0].get(layer)
        path = data.child(folder, f"{prompt_id}.json", is_dir=False)
        if path is not None and not prompt_id.startswith("_"):
            file = read_projection(data, path, where.exp, where.variant, where.prompt_set)
            if file.dims is not None:
                return file
            found.append(file)
    if not found:
        raise NotFound(f"no projections of prompt {prompt_id!r} of {where.variant}/"
                       f"{where.prompt_set} at layer {layer}; run "
                       f"'{project_hint(data, where.exp, where.variant, where.prompt_set)} "
                       f"--layer {layer}'")
    return found[0]

