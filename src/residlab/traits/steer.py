"""Steering evaluation: answer a trait's questions with ``coef x unit vector`` added, then judge.

Every (layer, coefficient) row and the unsteered baseline are packed into the same batches,
one ``Add`` per layer whose per-row vectors are zero on rows steered elsewhere. Answers are
saved before judging (``answers.jsonl``), so a failed judge loses nothing: rerun with
``--rescore``. Results accumulate in ``experiments/{exp}/steering/{trait}/{variant}/results.jsonl``
(one row per question and setting; a rerun of the same setting replaces its rows).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from residlab.arch import resolve_arch
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment, load_variant
from residlab.generation import generate_ids
from residlab.hooks import Add, Intervention
from residlab.prompts import template_ids
from residlab.store import read_jsonl, write_jsonl
from residlab.traits.data import load_trait
from residlab.traits.judge import Judge, coherence_prompt, trait_prompt
from residlab.traits.vectors import find_vectors, load_vector

__all__ = ["SteerRow", "pack_interventions", "run_steering", "steering_dir", "summarize"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SteerRow:
    question: str
    layer: int | None  # None: the unsteered baseline
    coefficient: float


def steering_dir(experiment: Experiment, trait: str, variant: str) -> Path:
    return experiment.path / "steering" / trait / variant


def pack_interventions(rows: Sequence[SteerRow], units: dict[int, torch.Tensor],
                       site: str = "resid_post", positions: str = "all") -> list[Intervention]:
    """One Add per layer; row i carries ``coef * unit`` at its own layer and zero elsewhere."""
    out: list[Intervention] = []
    for layer, unit in sorted(units.items()):
        vectors = torch.stack([unit * row.coefficient if row.layer == layer
                               else torch.zeros_like(unit) for row in rows])  # (B, d)
        if vectors.abs().sum() > 0:
            out.append(Add(layer, vectors, site=site, positions=positions))
    return out


def _vectors(experiment, trait, variant, layers, method, position, component, d_model):
    units = {}
    for layer in layers:
        found = [f for f in find_vectors(experiment, trait, variant, position=position,
                                         component=component, method=method) if f.layer == layer]
        if not found:
            have = sorted({(f.method, f.layer) for f in find_vectors(
                experiment, trait, variant, position=None, component=component, method=None)})
            raise NotFound(
                f"no {method} vector for {trait} at layer {layer} ({position}, {component}, "
                f"variant {variant}); stored: {have[:12] or 'none'}; run 'residlab extract' first")
        units[layer] = load_vector(found[0].path, d_model).unit
    return units


def _answer(loaded, rows, units, *, max_new_tokens, batch_size, positions) -> list[str]:
    tokenizer, answers = loaded.tokenizer, []
    n_batches = -(-len(rows) // batch_size)
    size = -(-len(rows) // max(n_batches, 1))  # even batches: no small straggler at the end
    for start in tqdm(range(0, len(rows), size), desc="steering", disable=None):
        chunk = rows[start:start + size]
        prompts = [template_ids(tokenizer, [{"role": "user", "content": r.question}])[1]
                   for r in chunk]
        generated = generate_ids(loaded.model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 interventions=pack_interventions(chunk, units,
                                                                  positions=positions))
        answers += [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in generated]
    return answers


def run_steering(
    experiment: Experiment, trait: str, *, layers: Sequence[int], coefficients: Sequence[float],
    judge: Judge, variant: str | None = None, vector_variant: str | None = None,
    method: str = "mean_diff", position: str = "response[:5]", component: str = "residual",
    max_new_tokens: int = 48, batch_size: int = 32, positions: str = "all",
    rescore: bool = False, loaded=None,
) -> Path:
    """Generate (unless ``rescore``), judge, and merge into results.jsonl; returns its path."""
    data = load_trait(trait)
    if not data.questions:
        raise UsageError(f"{data.path}/steering.json has no questions")
    variant_name, _ = experiment.variant(variant)
    source, _ = experiment.variant(vector_variant, role="extraction")
    folder = steering_dir(experiment, data.name, variant_name)
    setting = {"method": method, "position": position, "component": component,
               "vector_variant": source}
    answers_file = folder / "answers.jsonl"
    if rescore:
        if not answers_file.is_file():
            raise UsageError(f"{answers_file} not found; run without --rescore first")
        answered = read_jsonl(answers_file)
    else:
        loaded = loaded or load_variant(experiment, variant_name)
        arch = resolve_arch(loaded.model)
        chosen = sorted({arch.normalize_layer(layer) for layer in layers})
        units = _vectors(experiment, data.name, source, chosen, method, position, component,
                         arch.d_model)
        rows = [SteerRow(q, None, 0.0) for q in data.questions] + [
            SteerRow(q, layer, float(c)) for layer in chosen for c in coefficients if c != 0
            for q in data.questions]
        texts = _answer(loaded, rows, units, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, positions=positions)
        answered = [{**setting, "question": r.question, "layer": r.layer,
                     "coefficient": r.coefficient, "answer": a} for r, a in zip(rows, texts,
                                                                               strict=True)]
        write_jsonl(answers_file, answered)
    try:
        trait_scores = judge.score([trait_prompt(data.definition, r["question"], r["answer"],
                                                 judge.scale) for r in answered])
        coherence = judge.score([coherence_prompt(r["question"], r["answer"], judge.scale)
                                 for r in answered])
    except ConnectionError as error:
        raise UsageError(f"{error}; the answers are kept in {answers_file}: rerun with "
                         "--rescore to score them") from None
    scored = [{**r, "trait_score": t, "coherence_score": c, "judge": judge.name}
              for r, t, c in zip(answered, trait_scores, coherence, strict=True)]
    return _merge(folder / "results.jsonl", scored)


def _key(row: dict) -> tuple:
    return (row["method"], row["position"], row["component"], row.get("vector_variant"),
            row["layer"], float(row["coefficient"]), row["question"])


def _merge(path: Path, rows: list[dict]) -> Path:
    old = read_jsonl(path) if path.is_file() else []
    new_keys = {_key(r) for r in rows}
    write_jsonl(path, [r for r in old if _key(r) not in new_keys] + rows)
    return path


def summarize(results: list[dict]) -> list[dict]:
    """Per setting (method, position, component, layer, coefficient): mean trait and
    coherence, and the trait gain over that method's baseline (coefficient 0)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in results:
        groups[_key(row)[:6]].append(row)
    baselines = {key[:4]: sum(r["trait_score"] for r in rs) / len(rs)
                 for key, rs in groups.items() if key[4] is None}
    out = []
    for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][4] is not None, kv[0][4] or 0,
                                                          kv[0][5])):
        trait = sum(r["trait_score"] for r in rs) / len(rs)
        base = baselines.get(key[:4], float("nan"))
        out.append({"method": key[0], "position": key[1], "component": key[2],
                    "vector_variant": key[3], "layer": key[4], "coefficient": key[5],
                    "trait": trait, "coherence": sum(r["coherence_score"] for r in rs) / len(rs),
                    "gain": trait - base, "n": len(rs)})
    return out


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'layer':>6} {'coef':>8} {'trait':>7} {'coherence':>10} {'gain':>7}"]
    for r in rows:
        layer = "base" if r["layer"] is None else str(r["layer"])
        lines.append(f"{layer:>6} {r['coefficient']:>8g} {r['trait']:>7.1f} "
                     f"{r['coherence']:>10.1f} {r['gain']:>+7.1f}")
    return "\n".join(lines)


def load_results(experiment: Experiment, trait: str, variant: str) -> list[dict]:
    path = steering_dir(experiment, trait, variant) / "results.jsonl"
    return read_jsonl(path) if path.is_file() else []



def steering_interventions(experiment: Experiment, loaded, specs) -> list[Intervention]:
    """``[(trait, layer, coef)]`` -> Adds of ``coef x unit vector`` (extraction variant's)."""
    from residlab.traits.select import select_vectors

    source, _ = experiment.variant(None, role="extraction")
    d_model = resolve_arch(loaded.model).d_model
    out: list[Intervention] = []
    for trait, layer, coefficient in specs:
        (choice,) = select_vectors(experiment, trait, variant=source, layer=layer)
        log.info("steering %s: %s, coefficient %g", trait, choice.reason, coefficient)
        if choice.vector.vector.shape[0] != d_model:
            raise UsageError(f"vector for {trait} has size {choice.vector.vector.shape[0]}, "
                             f"the model's hidden size is {d_model}")
        out.append(Add(choice.vector.layer, choice.vector.unit * coefficient, site="resid_post"))
    return out
