"""Extract trait vectors from contrastive data.

Each line of ``positive.txt`` / ``negative.txt`` is a text prefix that the extraction variant
continues (greedy). The prefix + continuation is captured with the capture code, pooled by the
position spec, and every (layer, method) gets a direction fitted on the training pairs and
scored on held-out pairs (accuracy, Cohen's d).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from residlab.arch import resolve_arch
from residlab.errors import UsageError
from residlab.experiments import Experiment, load_variant
from residlab.generation import generate_ids
from residlab.inference.capture import COMPONENT_SITES, capture_records, parse_layers
from residlab.progress import progress
from residlab.store import atomic_path, write_json
from residlab.traits.data import TraitData, load_trait
from residlab.traits.methods import METHODS, evaluate, fit, split_pairs
from residlab.traits.positions import parse_position, pool, position_slug
from residlab.traits.vectors import TraitVector, extraction_dir, save_vector

__all__ = ["ExtractionResult", "extract_trait", "pooled_activations", "summary"]

log = logging.getLogger(__name__)
SIDES = ("positive", "negative")
ORIENTATION = ("signed so that the positive line of most training pairs projects higher "
               "(flipped: the method's own sign was reversed)")


@dataclass(frozen=True)
class ExtractionResult:
    trait: str
    variant: str
    folder: Path
    stats: dict[str, list[dict]]  # method -> per-layer held-out stats


def _completions(loaded, data: TraitData, folder: Path, max_new_tokens: int,
                 batch_size: int) -> dict[str, list[dict]]:
    """Greedy continuations of every line (cached in completions.json)."""
    cache = folder / "completions.json"
    if cache.is_file():
        saved = json.loads(cache.read_text("utf-8"))
        lines = {side: [r["text"] for r in saved.get(side, [])] for side in SIDES}
        if (saved.get("max_new_tokens") == max_new_tokens and lines["positive"] == data.positive
                and lines["negative"] == data.negative):
            return saved
    out: dict = {"max_new_tokens": max_new_tokens}
    tokenizer = loaded.tokenizer
    bar = progress(total=len(data.positive) + len(data.negative), desc="completions",
                   unit="lines")
    for side in SIDES:
        texts = getattr(data, side)
        records = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            prompts = [tokenizer(text)["input_ids"] for text in chunk]
            generated = generate_ids(loaded.model, tokenizer, prompts,
                                     max_new_tokens=max_new_tokens)
            records += [{"text": text, "prompt_ids": ids, "response_ids": g.token_ids,
                         "completion": tokenizer.decode(g.token_ids, skip_special_tokens=True)}
                        for text, ids, g in zip(chunk, prompts, generated, strict=True)]
            bar.update(len(chunk))
        out[side] = records
    bar.close()
    write_json(cache, out)
    return out


def pooled_activations(
    loaded, arch, records: list[dict], layers: Sequence[int], component: str, position: str,
    batch_size: int = 16,
) -> torch.Tensor:
    """``(n_records, n_layers, d)`` float32: each record pooled by ``position`` per layer."""
    parse_position(position)
    rows = [{"token_ids": r["prompt_ids"] + r["response_ids"], "prompt_end": len(r["prompt_ids"])}
            for r in records]
    pad = loaded.tokenizer.pad_token_id or 0
    out = []
    bar = progress(total=len(rows), desc="activations", unit="examples")
    for start in range(0, len(rows), batch_size):
        captured = capture_records(loaded.model, arch, rows[start:start + batch_size], layers,
                                   [component], pad_id=pad, dtype=torch.float32)
        for tensors in captured:
            out.append(torch.stack([
                pool(tensors[f"prompt.layer{layer}.{component}"],
                     tensors[f"response.layer{layer}.{component}"], position)
                for layer in layers]))  # (n_layers, d)
        bar.update(len(captured))
    bar.close()
    return torch.stack(out)


def _save_activations(path: Path, acts: dict[str, torch.Tensor], layers: list[int]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as temp:
        save_file({k: v.contiguous() for k, v in acts.items()}, str(temp),
                  metadata={"layers": json.dumps(layers)})


def extract_trait(
    experiment: Experiment, trait: str, *, variant: str | None = None,
    methods: Sequence[str] = ("mean_diff", "probe", "pca"), position: str = "response[:5]",
    component: str = "residual", layers: str | None = None, max_new_tokens: int = 16,
    test_fraction: float = 0.2, seed: int = 0, batch_size: int = 16, loaded=None,
) -> ExtractionResult:
    """Generate, capture, pool and fit; vectors and stats land in the experiment."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; use {', '.join(METHODS)}")
    if component not in COMPONENT_SITES:
        raise UsageError(f"unknown component {component!r}; use {', '.join(COMPONENT_SITES)}")
    parse_position(position)
    data = load_trait(trait)
    train, test = split_pairs(len(data.positive), test_fraction, seed)  # checked before work
    variant_name, _ = experiment.variant(variant, role="extraction")
    loaded = loaded or load_variant(experiment, variant_name, role="extraction")
    arch = resolve_arch(loaded.model)
    chosen = parse_layers(layers, arch.n_layers)
    folder = extraction_dir(experiment, data.name, variant_name)
    completions = _completions(loaded, data, folder, max_new_tokens, batch_size)
    acts = {side: pooled_activations(loaded, arch, completions[side], chosen, component,
                                     position, batch_size) for side in SIDES}  # (n, L, d)
    _save_activations(folder / "activations" / position_slug(position)
                      / f"{component}.safetensors", acts, chosen)
    stats: dict[str, list[dict]] = {}
    for method in methods:
        stats[method] = []
        for index, layer in enumerate(chosen):
            pos, neg = (acts[side][:, index].double().numpy() for side in SIDES)  # (n, d)
            fitted = fit(method, pos[train], neg[train])
            direction = fitted.direction
            scores = evaluate(direction, (pos[train], neg[train]), (pos[test], neg[test]))
            row = {"layer": layer, "accuracy": scores.accuracy,
                   "effect_size": scores.effect_size, "baseline": scores.baseline,
                   "norm": scores.norm, "n_train": len(train), "n_test": len(test),
                   "flipped": fitted.flipped, "train_pair_accuracy": fitted.pair_accuracy}
            save_vector(experiment, TraitVector(
                data.name, variant_name, position, component, method, layer,
                torch.from_numpy(direction).float(), {k: v for k, v in row.items()
                                                      if k != "layer"}))
            stats[method].append(row)
        write_json(folder / "vectors" / position_slug(position) / component / method
                   / "metadata.json", {"trait": data.name, "variant": variant_name,
                                       "position": position, "component": component,
                                       "method": method, "test_fraction": test_fraction,
                                       "seed": seed, "test_pairs": [int(i) for i in test],
                                       "orientation": ORIENTATION,
                                       "layers": stats[method]})
    return ExtractionResult(data.name, variant_name, folder, stats)


def summary(result: ExtractionResult) -> str:
    """Held-out accuracy / effect size per layer and method, as a small table."""
    methods = list(result.stats)
    lines = [f"{result.trait} ({result.variant}): held-out accuracy / Cohen's d",
             "layer " + "".join(f"{m:>20}" for m in methods)]
    for i, row in enumerate(result.stats[methods[0]]):
        cells = [result.stats[m][i] for m in methods]
        lines.append(f"{row['layer']:>5} " + "".join(
            f"{c['accuracy']:>12.2f} / {c['effect_size']:>5.2f}" for c in cells))
    return "\n".join(lines)

