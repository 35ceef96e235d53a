"""The vector logit lens: which tokens each stored trait vector pushes the model toward.

For a trait vector ``v`` the lens reads ``W_U @ (v / |v|)``: the direct effect of the direction
on the logits, through the unembedding matrix alone. No final norm is applied (it would make
the result depend on the hidden state the vector is added to), no bias and no logit softcap
(both leave the ranking and the differences between tokens unchanged, and the softcap would
squash the values). It is computed in float32 whatever the model's dtype. Rows of a padded
embedding matrix beyond the tokenizer are never reported.

One file per trait, beside its vectors::

    experiments/{exp}/extraction/{trait}/{variant}/logit_lens.json
    {"trait", "variant", "model", "top_k", "filter_common", "vocab_size", "common",
     "vectors": [{"method", "layer", "position", "component", "norm",
                  "toward": [{"token", "token_id", "logit"}], "away": [...]}]}

``toward`` is sorted from the largest logit down, ``away`` from the most negative up.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from residlab.arch import resolve_arch
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment, load_experiment, load_variant
from residlab.progress import progress
from residlab.store import write_json
from residlab.traits.data import find_trait
from residlab.traits.vectors import TraitVector, extraction_dir, load_vector

__all__ = ["LENS_FILE", "HeadWeights", "direction_logits", "head_weights", "lens_path",
           "vector_logit_lens"]

LENS_FILE = "logit_lens.json"
CHUNK_BYTES = 2**28  # float32 rows of W_U converted at a time (keeps bf16 models' peak small)


def lens_path(experiment: Experiment, trait: str, variant: str) -> Path:
    return extraction_dir(experiment, trait, variant) / LENS_FILE


# --- the unembedding ------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadWeights:
    """The LM head as a matrix: ``weight`` ``(V, D)`` plus, for an unmerged LoRA adapter on
    the head, its ``delta`` ``(V, D)`` float32 (``None`` otherwise)."""

    weight: torch.Tensor
    delta: torch.Tensor | None = None


def head_weights(unembed: nn.Module | None) -> HeadWeights:
    """The matrix the LM head multiplies by; one line saying what to do when it is not one."""
    if unembed is None:
        raise UsageError("this model has no unembedding (LM head) that residlab can find")
    if hasattr(unembed, "lora_A") and hasattr(unembed, "get_delta_weight"):
        return _lora_head(unembed)
    if not isinstance(unembed, nn.Linear):
        raise UsageError(f"the LM head is a {type(unembed).__name__}, not a linear layer; merge "
                         "any adapter on it (peft merge_and_unload) and use the merged model")
    if not unembed.weight.is_floating_point():
        raise UsageError("the LM head is quantised; load the model without 8/4-bit "
                         "quantisation to read its logit lens")
    return HeadWeights(unembed.weight)


def _lora_head(layer: nn.Module) -> HeadWeights:
    """A LoRA layer on the head acts as ``W + sum of its active, unmerged deltas``."""
    base = layer.get_base_layer()
    if getattr(layer, "disable_adapters", False):
        return HeadWeights(base.weight)
    names = [name for name in layer.active_adapters
             if name in layer.lora_A and name not in layer.merged_adapters]
    if any(getattr(layer, "use_dora", {}).get(name) for name in names):
        raise UsageError("the LM head carries a DoRA adapter; merge it (peft merge_and_unload) "
                         "and use the merged model")
    deltas = [layer.get_delta_weight(name).float() for name in names]  # each (V, D)
    return HeadWeights(base.weight, torch.stack(deltas).sum(0) if deltas else None)


def direction_logits(head: HeadWeights, units: torch.Tensor, vocab: int) -> torch.Tensor:
    """``W_U[:vocab] @ units.T`` in float32 -> ``(n, vocab)``, on the head's device; rows of W_U
    are converted a chunk at a time so a bf16 head is never copied whole."""
    weight = head.weight
    units = units.to(weight.device, torch.float32)  # (n, D)
    step = max(1, CHUNK_BYTES // (4 * weight.shape[1]))
    parts = []
    for start in range(0, vocab, step):
        stop = min(start + step, vocab)
        rows = weight[start:stop].float()  # (c, D)
        if head.delta is not None:
            rows = rows + head.delta[start:stop].to(weight.device)
        parts.append(units @ rows.T)  # (n, c)
    return torch.cat(parts, dim=1)  # (n, vocab)


# --- which vectors ------------------------------------------------------------------------

def _check_name(trait: str) -> None:
    parts = Path(trait).parts
    if not trait.strip() or Path(trait).is_absolute() or ".." in parts:
        raise UsageError(f"trait name {trait!r} must be a relative name such as "
                         "emotion/optimism (no '..')")


def _traits_with_vectors(experiment: Experiment, variant: str) -> list[str]:
    root = experiment.path / "extraction"
    found = {path.parents[5].relative_to(root).as_posix()
             for path in root.glob(f"**/{glob.escape(variant)}/vectors/*/*/*/layer*.safetensors")}
    return sorted(name for name in found if name != ".")


def _vector_files(experiment: Experiment, trait: str, variant: str) -> list[Path]:
    root = extraction_dir(experiment, trait, variant) / "vectors"
    return sorted(root.glob("*/*/*/layer*.safetensors"))


def _is_known(experiment: Experiment, trait: str) -> bool:
    """A trait is known if the experiment extracted it (any variant) or its data exists."""
    if (experiment.path / "extraction" / trait).is_dir():
        return True
    try:
        find_trait(trait)
    except NotFound:
        return False
    return True


def _missing(experiment: Experiment, trait: str, variant: str) -> NotFound:
    if not _is_known(experiment, trait):
        listing = ", ".join(_traits_with_vectors(experiment, variant)) or "none"
        return NotFound(f"unknown trait {trait!r}: experiment {experiment.name!r} has no "
                        f"extraction or trait data by that name; traits with vectors for "
                        f"variant {variant}: {listing}")
    return NotFound(f"no vectors for trait {trait!r} (variant {variant}) in experiment "
                    f"{experiment.name!r}; make them with 'residlab extract --experiment "
                    f"{experiment.name} --traits {trait} --model-variant {variant}'")


def _plan(experiment: Experiment, variant: str, traits: list[str] | None) -> dict[str, list[Path]]:
    """Trait -> its vector files, every trait checked before anything is loaded."""
    names = list(dict.fromkeys(traits)) if traits else _traits_with_vectors(experiment, variant)
    if not names:
        raise NotFound(f"no trait vectors for variant {variant} in experiment "
                       f"{experiment.name!r}; make them with 'residlab extract --experiment "
                       f"{experiment.name} --traits ...'")
    plan = {}
    for trait in names:
        _check_name(trait)
        files = _vector_files(experiment, trait, variant)
        if not files:
            raise _missing(experiment, trait, variant)
        plan[trait] = files
    return plan


# --- ranking and records ------------------------------------------------------------------

Ranking = tuple[list[list[int]], list[list[float]]]  # ids and logits, one row per vector


def _ranked(logits: torch.Tensor, count: int) -> dict[str, Ranking]:
    """The ``count`` largest (toward) and smallest (away) entries of each row of ``(n, V)``."""
    top = torch.topk(logits, count, dim=1)  # (n, count), largest first
    low = torch.topk(logits, count, dim=1, largest=False)  # (n, count), most negative first
    return {"toward": (top.indices.tolist(), top.values.tolist()),
            "away": (low.indices.tolist(), low.values.tolist())}


def _pick(ids: list[list[int]], values: list[list[float]], top_k: int,
          filter_common: bool) -> tuple[list[list[tuple[int, float]]], list[int]]:
    """Each row's first ``top_k`` entries, after dropping the ids that are in the top ``top_k``
    of every row (only with ``filter_common`` and at least two rows: with one vector every
    token would be 'common')."""
    common: set[int] = set()
    if filter_common and len(ids) > 1:
        common = set.intersection(*(set(row[:top_k]) for row in ids))
    picked = [[(i, v) for i, v in zip(row_ids, row_values, strict=True) if i not in common][:top_k]
              for row_ids, row_values in zip(ids, values, strict=True)]
    return picked, sorted(common, key=ids[0].index) if common else []


class _Decoder:
    """``tokenizer.decode([id])`` once per id (tokens repeat across vectors)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]


def _entries(pairs: list[tuple[int, float]], decode: _Decoder) -> list[dict[str, Any]]:
    return [{"token": decode(i), "token_id": i, "logit": v} for i, v in pairs]


def _trait_lens(vectors: list[TraitVector], head: HeadWeights, vocab: int, top_k: int,
                filter_common: bool, decode: _Decoder) -> dict[str, Any]:
    """The ``common`` tokens and one record per vector, in the order of ``vectors``."""
    units = torch.stack([v.unit for v in vectors])  # (n, D)
    logits = direction_logits(head, units, vocab)  # (n, V)
    count = min(vocab, 2 * top_k if filter_common else top_k)
    records = [{"method": v.method, "layer": v.layer, "position": v.position,
                "component": v.component, "norm": float(v.vector.norm())} for v in vectors]
    common = {}
    for side, (ids, values) in _ranked(logits, count).items():
        picked, dropped = _pick(ids, values, top_k, filter_common)
        common[side] = [{"token": decode(i), "token_id": i} for i in dropped]
        for record, pairs in zip(records, picked, strict=True):
            record[side] = _entries(pairs, decode)
    return {"common": common, "vectors": records}


def _order(vector: TraitVector) -> tuple:
    return vector.position, vector.component, vector.method, vector.layer


def vector_logit_lens(
    experiment: Experiment | str, *, traits: list[str] | None = None,
    variant: str | None = None, loaded=None, top_k: int = 20, filter_common: bool = False,
) -> list[Path]:
    """Write ``logit_lens.json`` for each trait (default: every trait with vectors for the
    extraction variant, itself the experiment's ``defaults.extraction`` unless given); returns
    the files written.

    Per stored vector (method, layer, position, component): the ``top_k`` tokens with the
    largest and smallest entries of ``W_U @ unit_vector`` (float32; no final norm, bias or
    softcap: the direction's direct effect on the logits). ``filter_common`` drops the tokens
    that are in the top ``top_k`` of every vector of the trait (listed under ``common``), so
    what sets one layer or method apart shows; each vector still gets ``top_k`` tokens.
    ``loaded`` is the extraction variant's model, loaded here when not given. Every trait and
    vector is checked before a file is written."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"top_k must be a whole number >= 1, not {top_k!r}")
    if isinstance(experiment, str):
        experiment = load_experiment(experiment)
    variant_name, _ = experiment.variant(variant, role="extraction")
    plan = _plan(experiment, variant_name, traits)
    loaded = loaded or load_variant(experiment, variant_name, role="extraction")
    arch = resolve_arch(loaded.model)
    vectors = {trait: sorted((load_vector(path, arch.d_model) for path in files), key=_order)
               for trait, files in plan.items()}
    head = head_weights(arch.unembed)
    vocab = min(head.weight.shape[0], len(loaded.tokenizer))
    decode = _Decoder(loaded.tokenizer)
    header = {"variant": variant_name, "model": getattr(loaded, "name", None), "top_k": top_k,
              "filter_common": filter_common, "vocab_size": vocab}
    written = []
    with torch.no_grad():
        for trait in progress(list(vectors), desc="vector logit lens", unit="traits"):
            lens = _trait_lens(vectors[trait], head, vocab, top_k, filter_common, decode)
            path = lens_path(experiment, trait, variant_name)
            write_json(path, {"trait": trait, **header, **lens})
            written.append(path)
    return written
