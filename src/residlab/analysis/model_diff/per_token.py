"""Per-token model diff: where along a response two variants' trait projections part.

Both variants were run on the same tokens (B's responses, A captured with ``--responses-from``)
and projected with ``residlab project``; the delta of a response token is B's projection minus
A's, read from the two projection files (``projections/{trait}/{prompt_set}[_L{layer}]/{id}.json``)
of prompts paired by id.

```
model_diff/{A}_vs_{B}/per_token_diff/{trait}/L{layer}/{prompt_set}/{id}.json, aggregate.json
```
(``layers.py``: the same deltas at several layers; ``spans.py``: the top spans of a set.)

Clauses end after a token holding any of ``, . ; — \\n ! ? :``; clauses of whitespace only are
dropped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson

from residlab.analysis.model_diff import diff_dir
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment
from residlab.inference.project import projection_dir
from residlab.store import write_json

__all__ = ["PromptDelta", "format_top_clauses", "id_sort_key", "load_deltas", "per_token_diff",
           "split_clauses"]

log = logging.getLogger(__name__)

BREAKS = (",", ".", ";", "\u2014", "\n", "!", "?", ":")
Mode = Literal["clause", "window", "prompt"]
Sort = Literal["abs", "pos", "neg", "z"]
Source = Literal["projection", "logprobs"]


def split_clauses(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """``[start, end)`` token ranges, each ending after a token that holds a break character
    (or at the end); ranges whose text is whitespace only are dropped."""
    spans, start = [], 0
    for i, token in enumerate(tokens):
        if any(mark in token for mark in BREAKS):
            spans.append((start, i + 1))
            start = i + 1
    if start < len(tokens):
        spans.append((start, len(tokens)))
    return [(s, e) for s, e in spans if "".join(tokens[s:e]).strip()]


@dataclass(frozen=True)
class PromptDelta:
    """One prompt's response tokens and the per-token delta (B - A) over them."""

    prompt_id: str
    tokens: list[str]
    delta: np.ndarray  # (n,) float64
    prompt_text: str | None
    response_text: str | None


def id_sort_key(prompt_id: str) -> tuple[int, int, str]:
    """The natural order of prompt ids: numeric ids in numeric order, then the others (the
    order every listing of a prompt set uses)."""
    return (0, int(prompt_id), "") if prompt_id.isdigit() else (1, 0, prompt_id)


def _read(path: Path) -> dict[str, Any]:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as error:
        raise UsageError(f"{path} is not readable JSON ({error}); make it again") from None


# --- which projection folder ---------------------------------------------------------------

def _project_hint(experiment: Experiment, variant: str, prompt_set: str, trait: str,
                  layer: int | None) -> str:
    extra = f" --layer {layer}" if layer is not None else ""
    return (f"'residlab project --experiment {experiment.name} --prompt-set {prompt_set} "
            f"--model-variant {variant} --traits {trait}{extra}'")


def _layer_folders(plain: Path) -> dict[int, Path]:
    """``{prompt_set}_L{layer}`` siblings of ``plain`` that hold projections."""
    pattern = re.compile(re.escape(plain.name) + r"_L(-?\d+)")
    if not plain.parent.is_dir():
        return {}
    return {int(m.group(1)): p for p in plain.parent.iterdir()
            if (m := pattern.fullmatch(p.name)) and any(p.glob("*.json"))}


def _recorded_layers(folder: Path) -> set[int]:
    """The vector's layer and the layer asked for, as the folder's first file records them."""
    first = min(folder.glob("*.json"))
    source = _read(first).get("metadata", {}).get("vector_source", {})
    return {source[k] for k in ("layer", "requested_layer") if isinstance(source.get(k), int)}


def _folder(experiment: Experiment, variant: str, trait: str, prompt_set: str,
            layer: int | None) -> Path:
    """The projection folder of ``layer`` (``None``: the one un-numbered folder)."""
    plain = projection_dir(experiment, variant, trait, prompt_set)
    filled = plain.is_dir() and any(plain.glob("*.json"))
    per_layer = _layer_folders(plain)
    if layer is None and filled:
        return plain
    if layer is not None and layer in per_layer:
        return per_layer[layer]
    if layer is not None and filled and layer in _recorded_layers(plain):
        return plain
    held = sorted(per_layer) + (sorted(_recorded_layers(plain)) if filled else [])
    if layer is None and per_layer:
        raise UsageError(f"projections of {trait} for {variant} on {prompt_set} are per layer "
                         f"(layers {sorted(per_layer)}); pass --layer")
    where = f" at layer {layer}" if layer is not None else ""
    have = f" (it has layers {held})" if held else ""
    raise NotFound(f"no projections of {trait}{where} for variant {variant} on {prompt_set}"
                   f"{have}; run {_project_hint(experiment, variant, prompt_set, trait, layer)}")


def _projected_traits(experiment: Experiment, variant: str, prompt_set: str) -> set[str]:
    """Traits with a projection folder for ``prompt_set`` (plain or per layer)."""
    root = experiment.inference_dir(variant) / "projections"
    name = re.compile(rf"(.+)/{re.escape(prompt_set)}(_L-?\d+)?")
    found = set()
    for folder, _, files in os.walk(root):
        match = name.fullmatch(Path(folder).relative_to(root).as_posix())
        if match and any(f.endswith(".json") for f in files):
            found.add(match.group(1))
    return found


def _traits(experiment: Experiment, a: str, b: str, sets: tuple[str, str],
            trait: str | None) -> list[str]:
    """``trait`` checked, or (``None`` / ``"all"``) every trait projected for both variants."""
    have_a = _projected_traits(experiment, a, sets[0])
    have_b = _projected_traits(experiment, b, sets[1])
    if trait not in (None, "all"):
        if trait not in have_a | have_b and not (experiment.path / "extraction" / trait).is_dir():
            known = ", ".join(sorted(have_a | have_b)) or "none"
            raise NotFound(f"unknown trait {trait!r}; traits with projections: {known}")
        return [trait]
    common = sorted(have_a & have_b)
    if not common:
        only = f" ({a}: {sorted(have_a) or 'none'}; {b}: {sorted(have_b) or 'none'})"
        missing = a if not have_a else b
        raise NotFound(f"no trait has projections for both variants{only}; run "
                       f"'residlab project --experiment {experiment.name} --model-variant "
                       f"{missing} --prompt-set {sets[0] if missing == a else sets[1]}'")
    return common


# --- tokens and texts ----------------------------------------------------------------------

def _capture_meta(path: Path) -> dict[str, Any] | None:
    """The ``residlab`` metadata of a capture's safetensors header (``None``: unreadable)."""
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        return json.loads(header["__metadata__"]["residlab"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _texts(experiment: Experiment, variant: str, prompt_set: str, prompt_id: str) -> dict | None:
    """Response tokens, prompt and response text: from the capture header, else the response
    JSON (``None`` when neither has tokens)."""
    meta = _capture_meta(experiment.raw_dir(variant, prompt_set) / f"{prompt_id}.safetensors")
    parts = (meta or {}).get("parts", {})
    if isinstance(parts.get("response", {}).get("tokens"), list):
        prompt = parts.get("prompt", {}).get("text")
        return {"tokens": parts["response"]["tokens"], "response_text": parts["response"]["text"],
                "prompt_text": prompt}
    path = experiment.responses_dir(variant, prompt_set) / f"{prompt_id}.json"
    if path.is_file():
        record = _read(path)
        tokens, end = record.get("tokens"), record.get("prompt_end")
        if isinstance(tokens, list) and isinstance(end, int):
            return {"tokens": tokens[end:], "response_text": record.get("response"),
                    "prompt_text": record.get("prompt")}
    return None


# --- deltas --------------------------------------------------------------------------------

def _response(record: dict, path: Path) -> np.ndarray:
    values = record.get("projections", {}).get("response")
    if not isinstance(values, list):
        raise UsageError(f"{path} has no response projections; project it again")
    return np.asarray(values, dtype=np.float64)  # (n,)


def _check_same_vector(rec_a: dict, rec_b: dict, trait: str, prompt_id: str) -> None:
    sha_a, sha_b = (r["metadata"].get("settings", {}).get("vector", {}).get("sha256")
                    for r in (rec_a, rec_b))
    if sha_a != sha_b:
        raise UsageError(f"prompt {prompt_id}: the two variants' {trait} projections use "
                         "different vectors; project both with the same --layer, --method, "
                         "--position and --extraction-variant")


def _pair(experiment, a_side: tuple[str, str, Path], b_side: tuple[str, str, Path],
          trait: str, prompt_id: str) -> PromptDelta:
    """One prompt: B's projections minus A's, with B's tokens (A's when B has none)."""
    (a, set_a, dir_a), (b, set_b, dir_b) = a_side, b_side
    rec_a, rec_b = _read(dir_a / f"{prompt_id}.json"), _read(dir_b / f"{prompt_id}.json")
    _check_same_vector(rec_a, rec_b, trait, prompt_id)
    proj_a = _response(rec_a, dir_a / f"{prompt_id}.json")
    proj_b = _response(rec_b, dir_b / f"{prompt_id}.json")
    if proj_a.shape != proj_b.shape:
        raise UsageError(f"prompt {prompt_id}: {a} has {proj_a.size} response tokens and {b} "
                         f"has {proj_b.size}; capture {a} with 'residlab capture --experiment "
                         f"{experiment.name} --prompt-set {set_a} --model-variant {a} "
                         f"--responses-from {b}' and project again")
    texts = (_texts(experiment, b, set_b, prompt_id) or _texts(experiment, a, set_a, prompt_id))
    if texts is None or len(texts["tokens"]) != proj_b.size:
        raise UsageError(f"prompt {prompt_id}: no response tokens matching its {proj_b.size} "
                         f"projections in the captures or responses of {b} or {a}; capture "
                         "and project it again")
    return PromptDelta(prompt_id, list(texts["tokens"]), proj_b - proj_a,  # (n,)
                       texts["prompt_text"], texts["response_text"])


@dataclass(frozen=True)
class DeltaSet:
    """The per-token deltas of one trait at one layer over a prompt set."""

    trait: str
    layer: int  # the layer whose activations were projected (the vector's)
    vector: dict[str, Any]  # the vector's source and sha256, as the projections record them
    items: list[PromptDelta]


def load_deltas(experiment: Experiment, variant_a: str, variant_b: str, prompt_set: str, *,
                trait: str, layer: int | None = None, variant_a_prompt_set: str | None = None,
                ) -> DeltaSet:
    """Per prompt projected for both variants (paired by id), B's projection minus A's per
    response token. Prompts without response tokens are left out (logged)."""
    set_a = variant_a_prompt_set or prompt_set
    dir_a = _folder(experiment, variant_a, trait, set_a, layer)
    dir_b = _folder(experiment, variant_b, trait, prompt_set, layer)
    ids_a, ids_b = ({p.stem for p in d.glob("*.json")} for d in (dir_a, dir_b))
    common = sorted(ids_a & ids_b, key=id_sort_key)
    if not common:
        raise UsageError(f"no common prompts: {dir_a} and {dir_b} share no prompt id; project "
                         "both variants on the same prompt set")
    if len(ids_a | ids_b) > len(common):
        log.warning("%s: %d prompt(s) projected for one variant only are left out", trait,
                    len(ids_a | ids_b) - len(common))
    sources = [_read(min(d.glob("*.json")))["metadata"] for d in (dir_a, dir_b)]
    layers = [int(m["vector_source"]["layer"]) for m in sources]
    if layers[0] != layers[1]:
        raise UsageError(f"{trait}: {variant_a} was projected at layer {layers[0]} and "
                         f"{variant_b} at layer {layers[1]}; pass --layer")
    sides = ((variant_a, set_a, dir_a), (variant_b, prompt_set, dir_b))
    items = [_pair(experiment, *sides, trait, pid) for pid in common]
    empty = [item.prompt_id for item in items if not item.tokens]
    if empty:
        log.warning("%s: prompt(s) %s have no response tokens and are left out", trait, empty)
    return DeltaSet(trait, layers[0], sources[1].get("settings", {}).get("vector", {}),
                    [item for item in items if item.tokens])


def _experiment(experiment: Experiment | str) -> Experiment:
    from residlab.experiments import load_experiment

    return experiment if isinstance(experiment, Experiment) else load_experiment(experiment)


def _check_variants(experiment: Experiment, *variants: str) -> None:
    for variant in variants:
        experiment.variant(variant)  # NotFound naming the variants that exist


# --- per-token diff ------------------------------------------------------------------------

def _clauses(item: PromptDelta) -> list[dict[str, Any]]:
    """The response's clauses, highest mean delta first."""
    out = []
    for start, end in split_clauses(item.tokens):
        values = item.delta[start:end]
        out.append({"text": "".join(item.tokens[start:end]).strip(), "token_range": [start, end],
                    "mean_delta": float(values.mean()), "max_delta": float(values.max()),
                    "n_tokens": end - start})
    return sorted(out, key=lambda clause: -clause["mean_delta"])


def _prompt_record(item: PromptDelta, trait: str) -> dict[str, Any]:
    return {"prompt_id": item.prompt_id, "prompt_text": item.prompt_text, "trait": trait,
            "response_text": item.response_text, "tokens": item.tokens,
            "per_token_delta": item.delta.tolist(), "mean_delta": float(item.delta.mean()),
            "std_delta": float(item.delta.std()), "clauses": _clauses(item)}


def _per_position(items: Sequence[PromptDelta]) -> tuple[list[float], list[int]]:
    """Mean delta at each response position over the prompts that reach it, and their count."""
    longest = max(item.delta.size for item in items)
    sums, counts = np.zeros(longest), np.zeros(longest, dtype=np.int64)  # (T,)
    for item in items:
        sums[: item.delta.size] += item.delta
        counts[: item.delta.size] += 1
    return (sums / counts).tolist(), counts.tolist()


def _aggregate(records: list[dict], deltas: DeltaSet, top_pct: float,
               settings: dict[str, Any]) -> dict[str, Any]:
    """Across prompts: mean and (population) std of the prompts' mean deltas, the mean delta
    per position, and the top / bottom ``top_pct`` percent of all clauses."""
    means = np.array([record["mean_delta"] for record in records])  # (P,)
    clauses = [{"prompt_id": r["prompt_id"], **c} for r in records for c in r["clauses"]]
    n_top = math.ceil(len(clauses) * top_pct / 100)
    per_position, counts = _per_position(deltas.items)
    return {"trait": deltas.trait, **settings, "layer": deltas.layer, "vector": deltas.vector,
            "n_prompts": len(records), "mean_delta_across_prompts": float(means.mean()),
            "std_delta_across_prompts": float(means.std()),
            "per_position_mean_delta": per_position, "per_position_n_prompts": counts,
            "top_pct": top_pct, "n_clauses": len(clauses),
            "top_clauses_overall": sorted(clauses, key=lambda c: -c["mean_delta"])[:n_top],
            "bottom_clauses_overall": sorted(clauses, key=lambda c: c["mean_delta"])[:n_top]}


def _write_diff(out: Path, deltas: DeltaSet, top_pct: float, settings: dict) -> list[Path]:
    """Per-prompt files, then aggregate.json; files of prompts no longer paired go."""
    records = [_prompt_record(item, deltas.trait) for item in deltas.items]
    written = []
    for record in records:
        written.append(out / f"{record['prompt_id']}.json")
        write_json(written[-1], record, compact=True)
    for old in set(out.glob("*.json")) - set(written) - {out / "aggregate.json"}:
        old.unlink(missing_ok=True)
    write_json(out / "aggregate.json", _aggregate(records, deltas, top_pct, settings))
    return [*written, out / "aggregate.json"]


def per_token_diff(experiment: Experiment | str, variant_a: str, variant_b: str,
                   prompt_set: str, *, trait: str = "all", layer: int | None = None,
                   top_pct: float = 5.0, variant_a_prompt_set: str | None = None) -> list[Path]:
    """Per-token and per-clause deltas (B - A) of each trait's projections; returns the files
    written, each trait's ``aggregate.json`` last among its own (see :func:`format_top_clauses`).

    ``trait="all"``: every trait projected for both variants. ``layer=None``: the layer of the
    un-numbered projection folder. ``variant_a_prompt_set`` reads A's projections from another
    prompt set name (e.g. a replay made with ``--output-suffix``). Everything is read and
    checked before anything is written."""
    if not 0 < top_pct <= 100:
        raise UsageError(f"--top-pct {top_pct}: use a percentage in (0, 100]")
    experiment = _experiment(experiment)
    _check_variants(experiment, variant_a, variant_b)
    sets = (variant_a_prompt_set or prompt_set, prompt_set)
    loaded = [load_deltas(experiment, variant_a, variant_b, prompt_set, trait=name, layer=layer,
                          variant_a_prompt_set=variant_a_prompt_set)
              for name in _traits(experiment, variant_a, variant_b, sets, trait)]
    settings = {"experiment": experiment.name, "variant_a": variant_a, "variant_b": variant_b,
                "prompt_set": prompt_set, "variant_a_prompt_set": sets[0]}
    written: list[Path] = []
    for deltas in loaded:
        if not deltas.items:
            raise UsageError(f"{deltas.trait}: no paired prompt has response tokens")
        out = (diff_dir(experiment, variant_a, variant_b) / "per_token_diff" / deltas.trait
               / f"L{deltas.layer}" / prompt_set)
        written += _write_diff(out, deltas, top_pct, settings)
    return written


def _quote(text: str, width: int = 90) -> str:
    return repr(text if len(text) <= width else text[: width - 1] + "\u2026")


def format_top_clauses(aggregate: dict[str, Any] | Path | Sequence[Path]) -> str:
    """The top and bottom clauses of an ``aggregate.json`` (its content or path), or of every
    ``aggregate.json`` among the paths :func:`per_token_diff` returns."""
    if isinstance(aggregate, Sequence):
        return "\n\n".join(format_top_clauses(path) for path in aggregate
                            if Path(path).name == "aggregate.json")
    if isinstance(aggregate, Path):
        aggregate = _read(aggregate)
    lines = [f"{aggregate['trait']} L{aggregate['layer']} ({aggregate['variant_b']} - "
             f"{aggregate['variant_a']}): {aggregate['n_prompts']} prompts, mean delta "
             f"{aggregate['mean_delta_across_prompts']:+.4f} "
             f"(std {aggregate['std_delta_across_prompts']:.4f})"]
    for name in ("top", "bottom"):
        clauses = aggregate[f"{name}_clauses_overall"]
        lines.append(f"  {name} {aggregate['top_pct']:g}% of {aggregate['n_clauses']} clauses:")
        lines += [f"    {c['mean_delta']:+.4f}  prompt {c['prompt_id']}  {_quote(c['text'])}"
                  for c in clauses]
    return "\n".join(lines)
