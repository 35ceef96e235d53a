"""Steering evaluation: answer a trait's questions with ``coef x unit vector`` added, then judge.

Every (layer, coefficient) row and the unsteered baseline are packed into the same batches,
one ``Add`` per layer whose per-row vectors are zero on rows steered elsewhere. Answers are
saved before judging, so a failed judge loses nothing: rerun with ``--rescore``. Answers and
results are keyed by the full setting (see :mod:`residlab.traits.steer_results`): a rerun
replaces only its own setting's rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from residlab.arch import resolve_arch
from residlab.errors import NotFound, UsageError
from residlab.executors import Executor, Shard
from residlab.executors.local import LocalExecutor
from residlab.experiments import Experiment, load_variant
from residlab.generation import generate_ids
from residlab.hooks import Add, Intervention
from residlab.inference.jobs import VariantJob, VariantSource
from residlab.progress import progress
from residlab.prompts import template_ids
from residlab.store import read_jsonl
from residlab.traits.data import load_trait
from residlab.traits.judge import Judge, coherence_prompt, trait_prompt
from residlab.traits.select import select_vectors
from residlab.traits.steer_results import (
    answer_key,
    answers_path,
    format_summary,
    load_results,
    merge_rows,
    steering_dir,
    stored_settings,
    summarize,
)
from residlab.traits.vectors import find_vectors, load_vector

__all__ = ["SteerJob", "SteerRow", "Steering", "format_summary", "load_results",
           "pack_interventions", "resolve_steering", "run_steering", "steering_dir",
           "steering_interventions", "summarize"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SteerRow:
    question: str
    layer: int | None  # None: the unsteered baseline
    coefficient: float


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


class SteerJob(VariantJob):
    """Steering answers on workers: a shard is one batch of rows (questions and their layer
    and coefficient), its result the decoded answers; every worker holds the unit vectors."""

    def __init__(self, source: VariantSource | None, units: dict[int, torch.Tensor], *,
                 max_new_tokens: int, positions: str, loaded=None):
        super().__init__(source, loaded=loaded)
        self.units, self.max_new_tokens, self.positions = units, max_new_tokens, positions

    def compute(self, payload: list[SteerRow]) -> list[str]:
        tokenizer = self.loaded.tokenizer
        prompts = [template_ids(tokenizer, [{"role": "user", "content": r.question}])[1]
                   for r in payload]
        generated = generate_ids(self.loaded.model, tokenizer, prompts,
                                 max_new_tokens=self.max_new_tokens,
                                 interventions=pack_interventions(payload, self.units,
                                                                  positions=self.positions))
        return [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in generated]


def _answer(loaded, rows, units, *, max_new_tokens, batch_size, positions,
            executor: Executor | None = None, source: VariantSource | None = None) -> list[str]:
    """Every row's answer, in even batches (no small straggler at the end) on ``executor``
    (default: this process; a remote one loads ``source`` on each worker)."""
    job = SteerJob(source, units, max_new_tokens=max_new_tokens, positions=positions,
                   loaded=loaded)
    n_batches = -(-len(rows) // batch_size)
    size = -(-len(rows) // max(n_batches, 1))
    shards = [Shard(key, rows[start:start + size], len(rows[start:start + size]))
              for key, start in enumerate(range(0, len(rows), size))]
    answers: dict[int, list[str]] = {}

    def keep(shard: Shard, texts: list[str]) -> None:
        answers[shard.key] = texts

    with progress(total=len(rows), desc="steering", unit="answers") as bar:
        (executor or LocalExecutor()).run(job, shards, keep, bar=bar)
    return [text for key in sorted(answers) for text in answers[key]]


def _saved_answers(folder: Path, setting: dict) -> list[dict]:
    """The answers of exactly this setting, for ``--rescore``."""
    path = answers_path(folder, setting)
    if path.is_file():
        return read_jsonl(path)
    def shown(values: dict) -> str:
        return ", ".join(f"{key}={value}" for key, value in values.items())

    listing = "; ".join(shown(s) for s in stored_settings(folder)[:4])
    raise UsageError(f"no saved answers for this setting ({shown(setting)}) in {folder}; "
                     f"saved: {listing or 'none'}; run without --rescore first, or pass the "
                     "flags of a saved setting")


def _generate(experiment, data, setting, *, variant_name, layers, coefficients, loaded,
              max_new_tokens, batch_size, positions, executor=None) -> list[dict]:
    """Answer every question unsteered and at each (layer, coefficient)."""
    loaded = loaded or load_variant(experiment, variant_name)
    arch = resolve_arch(loaded.model)
    chosen = sorted({arch.normalize_layer(layer) for layer in layers})
    units = _vectors(experiment, data.name, setting["vector_variant"], chosen, setting["method"],
                     setting["position"], setting["component"], arch.d_model)
    rows = [SteerRow(q, None, 0.0) for q in data.questions] + [
        SteerRow(q, layer, float(c)) for layer in chosen for c in coefficients if c != 0
        for q in data.questions]
    texts = _answer(loaded, rows, units, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    positions=positions, executor=executor,
                    source=VariantSource(experiment, variant_name))
    return [{**setting, "question": r.question, "layer": r.layer, "coefficient": r.coefficient,
             "answer": a} for r, a in zip(rows, texts, strict=True)]


def _judge(judge: Judge, definition: str, answered: list[dict], kept_in: Path) -> list[dict]:
    try:
        trait_scores = judge.score([trait_prompt(definition, r["question"], r["answer"],
                                                 judge.scale) for r in answered])
        coherence = judge.score([coherence_prompt(r["question"], r["answer"], judge.scale)
                                 for r in answered])
    except ConnectionError as error:
        raise UsageError(f"{error}; the answers are kept in {kept_in}: rerun with "
                         "--rescore to score them") from None
    return [{**r, "trait_score": t, "coherence_score": c, "judge": judge.name}
            for r, t, c in zip(answered, trait_scores, coherence, strict=True)]


def run_steering(
    experiment: Experiment, trait: str, *, layers: Sequence[int], coefficients: Sequence[float],
    judge: Judge, variant: str | None = None, vector_variant: str | None = None,
    method: str = "mean_diff", position: str = "response[:5]", component: str = "residual",
    max_new_tokens: int = 48, batch_size: int = 32, positions: str = "all",
    rescore: bool = False, loaded=None, executor: Executor | None = None,
) -> Path:
    """Generate (unless ``rescore``), judge, and merge into results.jsonl; returns its path.

    ``executor`` generates the answers (default: this process); a remote one (Ray) loads the
    variant on each worker. The answers are saved here once all are in, as a local run does.

    ``rescore`` judges again every saved answer of this exact setting (the same method,
    position, component, vector variant, positions and max_new_tokens)."""
    data = load_trait(trait)
    if not data.questions:
        raise UsageError(f"{data.path}/steering.json has no questions")
    variant_name, _ = experiment.variant(variant)
    source, _ = experiment.variant(vector_variant, role="extraction")
    folder = steering_dir(experiment, data.name, variant_name)
    setting = {"method": method, "position": position, "component": component,
               "vector_variant": source, "positions": positions,
               "max_new_tokens": max_new_tokens}
    answers_file = answers_path(folder, setting)
    if rescore:
        answered = _saved_answers(folder, setting)
    else:
        answered = _generate(experiment, data, setting, variant_name=variant_name, layers=layers,
                             coefficients=coefficients, loaded=loaded,
                             max_new_tokens=max_new_tokens, batch_size=batch_size,
                             positions=positions, executor=executor)
        merge_rows(answers_file, answered, key=answer_key)
    scored = _judge(judge, data.definition, answered, answers_file)
    return merge_rows(folder / "results.jsonl", scored)


@dataclass(frozen=True)
class Steering:
    """One ``TRAIT:LAYER:COEF`` request as applied: the layer actually used and why."""

    trait: str
    requested_layer: int
    layer: int
    coefficient: float
    intervention: Add
    reason: str
    vector: dict[str, Any]  # the vector's identity (trait, variant, method, position, ...)

    @property
    def tag(self) -> str:
        return f"steer:{self.trait}:{self.layer}:{self.coefficient:g}"

    def record(self) -> dict[str, Any]:
        return {"trait": self.trait, "requested_layer": self.requested_layer,
                "layer": self.layer, "coefficient": self.coefficient, "vector": self.vector,
                "selection": self.reason}


def resolve_steering(experiment: Experiment, loaded,
                     specs: Sequence[tuple[str, int, float]]) -> list[Steering]:
    """``[(trait, layer, coef)]`` -> what will be added: ``coef x unit vector`` of the
    extraction variant's vector, its layer normalised (``-1`` is the last) and snapped to the
    nearest stored layer (logged)."""
    source, _ = experiment.variant(None, role="extraction")
    arch = resolve_arch(loaded.model)
    out: list[Steering] = []
    for trait, layer, coefficient in specs:
        (choice,) = select_vectors(experiment, trait, variant=source, layer=layer,
                                   n_layers=arch.n_layers)
        log.info("steering %s: %s, coefficient %g", trait, choice.reason, coefficient)
        vector = choice.vector
        if vector.vector.shape[0] != arch.d_model:
            raise UsageError(f"vector for {trait} has size {vector.vector.shape[0]}, "
                             f"the model's hidden size is {arch.d_model}")
        out.append(Steering(trait, choice.requested_layer, vector.layer, float(coefficient),
                            Add(vector.layer, vector.unit * coefficient, site="resid_post"),
                            choice.reason, vector.source()))
    return out


def steering_interventions(experiment: Experiment, loaded, specs) -> list[Intervention]:
    """The Adds of :func:`resolve_steering` alone."""
    return [s.intervention for s in resolve_steering(experiment, loaded, specs)]
