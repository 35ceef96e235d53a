"""Per-token logit lens and attention patterns of a prompt set, for the Layer Deep Dive view.

Reads the variant's response JSONs (``token_ids``, ``prompt_end``) and runs its own prefill over
exactly those ids, so it works whatever an earlier capture kept (``--layers``,
``--response-only``). Writes, per prompt, under
``experiments/{exp}/analysis/per_token/{variant}/{prompt_set}/``:

- ``{id}_logit_lens.json``: the seed's shape (``predictions[].by_layer[]`` with ``top_k``,
  ``actual_rank``, ``actual_prob``) plus ``token_ids``, ``layers``, ``actual_next_token_id`` and
  a ``token_id`` in every top-k entry. Layers are real layer numbers, ``"embed"`` first.
- ``{id}_attention.safetensors``: tensor ``attention`` ``(n_layers_selected, H, T, T)`` float16
  (zero above the diagonal), metadata ``layers``, ``tokens``, ``token_ids``, ``prompt_end``;
  ``--format json`` also writes the seed's ``{id}_attention.json``.

Every file records what made it (token hash, layers, top-k); ``--skip-existing`` keeps a file
only when those match.

    python -m residlab.inference.extract_viz --experiment E --prompt-set S --attention --logit-lens
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from residlab.arch import Arch, resolve_arch
from residlab.errors import NotFound, UsageError
from residlab.executors import Executor, Shard
from residlab.executors.local import LocalExecutor
from residlab.experiments import Experiment, load_variant
from residlab.inference.capture import parse_layers
from residlab.inference.jobs import AttentionJob, LensJob, VariantSource
from residlab.inference.lens import Lens, LensReadout
from residlab.inference.raw import token_hash
from residlab.inference.responses import read_response
from residlab.progress import progress
from residlab.store import atomic_path, write_json

__all__ = ["TokenText", "VizResult", "extract_viz", "viz_dir"]

log = logging.getLogger(__name__)
LENS_BATCH_TOKENS = 1024  # tokens per lens forward


@dataclass(frozen=True)
class VizResult:
    out_dir: Path
    written: list[Path]
    skipped: int


def viz_dir(experiment: Experiment, variant: str, prompt_set: str) -> Path:
    return experiment.path / "analysis" / "per_token" / variant / prompt_set


class TokenText:
    """Each id decoded on its own (what the dashboard shows for one token), memoized."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text

    def many(self, ids: Sequence[int]) -> list[str]:
        return [self(int(i)) for i in ids]

    def table(self, ids: torch.Tensor) -> dict[int, str]:
        """``{id: text}`` of every id in ``ids``: a plain dict lookup per entry when a lens
        document names some two million top-k tokens."""
        return {token: self(token) for token in ids.unique().tolist()}


def _response_paths(experiment: Experiment, variant: str, prompt_set: str,
                    limit: int | None) -> list[Path]:
    source = experiment.responses_dir(variant, prompt_set)
    paths = sorted(source.glob("*.json"))
    if not paths:
        raise NotFound(f"no response JSONs in {source}; run 'residlab responses --experiment "
                       f"{experiment.name} --prompt-set {prompt_set} --model-variant {variant}' "
                       "first")
    return paths[:limit]


def _records(paths: list[Path], vocab: int) -> list[dict]:
    """Every response JSON read and checked before any file is written."""
    records = []
    for path in paths:
        record = read_response(path) | {"id": path.stem}
        if max(record["token_ids"]) >= vocab or min(record["token_ids"]) < 0:
            raise UsageError(f"{path}: token ids outside this model's vocabulary of {vocab}; "
                             "were the responses made with another model?")
        tokens = record.get("tokens")
        if isinstance(tokens, list) and len(tokens) != len(record["token_ids"]):
            raise UsageError(f"{path}: 'tokens' has {len(tokens)} entries but 'token_ids' "
                             f"{len(record['token_ids'])}; make the responses again")
        records.append(record)
    return records


# --- logit lens ----------------------------------------------------------------------------

def lens_document(record: dict, readout: LensReadout, text: TokenText, *, prompt_set: str,
                  n_layers: int, top_k: int, settings: dict) -> dict[str, Any]:
    """The seed's logit-lens JSON for one prompt, plus ids and what made it."""
    ids = record["token_ids"]
    layers = readout.layers
    top_ids = readout.top_ids.tolist()  # (L, T-1, k)
    top_probs = readout.top_probs.tolist()
    ranks, probs = readout.actual_rank.tolist(), readout.actual_prob.tolist()
    words = text.table(readout.top_ids)
    predictions = []
    for i in range(len(ids) - 1):
        by_layer = [{"layer": layer,
                     "top_k": [{"token": words[t], "token_id": t, "prob": p}
                               for t, p in zip(top_ids[row][i], top_probs[row][i], strict=True)],
                     "actual_rank": ranks[row][i], "actual_prob": probs[row][i]}
                    for row, layer in enumerate(layers)]
        predictions.append({"token_idx": i, "actual_next_token": text(ids[i + 1]),
                            "actual_next_token_id": ids[i + 1], "by_layer": by_layer})
    return {"prompt_id": record["id"], "prompt_set": prompt_set, "n_layers": n_layers,
            "top_k": top_k, "layers": layers, "tokens": text.many(ids), "token_ids": ids,
            "n_prompt_tokens": record["prompt_end"],
            "n_response_tokens": len(ids) - record["prompt_end"],
            "predictions": predictions, "settings": settings}


def _lens_batches(records: list[dict]) -> list[list[dict]]:
    batches: list[list[dict]] = []
    for record in sorted(records, key=lambda r: len(r["token_ids"])):
        width = len(record["token_ids"])
        if batches and (len(batches[-1]) + 1) * width <= LENS_BATCH_TOKENS:
            batches[-1].append(record)
        else:
            batches.append([record])
    return batches


# --- attention -----------------------------------------------------------------------------

def save_attention(path: Path, weights: torch.Tensor, record: dict, text: TokenText,
                   layers: list[int], settings: dict) -> None:
    """``weights`` ``(L, H, T, T)`` -> float16 safetensors with the prompt's tokens."""
    from safetensors.torch import save_file

    meta = {"layers": json.dumps(layers), "tokens": json.dumps(text.many(record["token_ids"]),
                                                               ensure_ascii=False),
            "token_ids": json.dumps(record["token_ids"]),
            "prompt_end": str(record["prompt_end"]), "settings": json.dumps(settings)}
    with atomic_path(path) as temp:
        save_file({"attention": weights.to(torch.float16).contiguous()}, str(temp),
                  metadata=meta)


def attention_document(record: dict, weights: torch.Tensor, text: TokenText,
                       layers: list[int], prompt_set: str) -> dict[str, Any]:
    """The seed's attention JSON: per query token, per layer, one row per head over the
    ``token_idx + 1`` keys it can see."""
    rows = weights.to(torch.float16).float()  # (L, H, T, T), the values the safetensors hold
    return {"prompt_id": record["id"], "prompt_set": prompt_set, "layers": layers,
            "n_heads": rows.shape[1], "tokens": text.many(record["token_ids"]),
            "token_ids": record["token_ids"], "n_prompt_tokens": record["prompt_end"],
            "attention": [{"token_idx": i, "context_size": i + 1,
                           "by_layer": rows[:, :, i, :i + 1].tolist()}
                          for i in range(rows.shape[-1])]}


def _attention_settings(path: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("settings", "null"))
    except Exception:  # an unreadable or foreign file is made again
        return None


def _lens_settings(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None


# --- the run ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    prompt_set: str
    layers: list[int]
    top_k: int
    out_dir: Path
    arch: Arch
    text: TokenText
    pad: int
    json_attention: bool

    def settings(self, record: dict, kind: str) -> dict:
        made = {"kind": kind, "layers": self.layers, "token_ids_sha256":
                token_hash(record["token_ids"]), "prompt_end": record["prompt_end"]}
        return made | ({"top_k": self.top_k} if kind == "logit_lens" else {})


def _todo(records: list[dict], plan: _Plan, kind: str, skip_existing: bool) -> list[dict]:
    if not skip_existing:
        return records
    suffix, read = (("_logit_lens.json", _lens_settings) if kind == "logit_lens"
                    else ("_attention.safetensors", _attention_settings))
    todo = []
    for record in records:
        path = plan.out_dir / f"{record['id']}{suffix}"
        if path.exists() and read(path) == plan.settings(record, kind):
            continue
        if path.exists():
            log.info("%s: made with other settings or tokens; making it again", path.name)
        todo.append(record)
    return todo


def _run_lens(executor: Executor, job: LensJob, plan: _Plan, todo: list[dict],
              bar) -> list[Path]:
    """One shard per lens batch; this process writes each prompt's JSON."""
    batches = _lens_batches(todo)
    shards = [Shard(key, [r["token_ids"] for r in batch], len(batch))
              for key, batch in enumerate(batches)]
    written: dict[int, list[Path]] = {}

    def write(shard: Shard, readouts: list[LensReadout]) -> None:
        written[shard.key] = []
        for record, readout in zip(batches[shard.key], readouts, strict=True):
            path = plan.out_dir / f"{record['id']}_logit_lens.json"
            write_json(path, lens_document(
                record, readout, plan.text, prompt_set=plan.prompt_set,
                n_layers=plan.arch.n_layers, top_k=plan.top_k,
                settings=plan.settings(record, "logit_lens")), compact=True)
            written[shard.key].append(path)

    executor.run(job, shards, write, bar=bar)
    return [path for key in sorted(written) for path in written[key]]


def _run_attention(executor: Executor, job: AttentionJob, plan: _Plan, todo: list[dict],
                   bar) -> list[Path]:
    """One shard per prompt; this process writes its safetensors (and JSON)."""
    shards = [Shard(key, record["token_ids"]) for key, record in enumerate(todo)]
    written: dict[int, Path] = {}

    def write(shard: Shard, weights: torch.Tensor) -> None:  # (L, H, T, T)
        record = todo[shard.key]
        path = plan.out_dir / f"{record['id']}_attention.safetensors"
        if plan.json_attention:
            write_json(plan.out_dir / f"{record['id']}_attention.json", attention_document(
                record, weights, plan.text, plan.layers, plan.prompt_set), compact=True)
        save_attention(path, weights, record, plan.text, plan.layers,
                       plan.settings(record, "attention"))
        written[shard.key] = path

    executor.run(job, shards, write, bar=bar)
    return [written[key] for key in sorted(written)]


def extract_viz(experiment: Experiment, prompt_set: str, *, variant: str | None = None,
                attention: bool = False, logit_lens: bool = False, layers: str | None = None,
                top_k: int = 50, limit: int | None = None, skip_existing: bool = False,
                json_attention: bool = False, loaded=None,
                executor: Executor | None = None) -> VizResult:
    """Write the logit lens and/or attention files of every response JSON of a prompt set.

    ``executor`` computes the lens batches and the per-prompt patterns (default: this
    process); a remote one (Ray) loads the variant on each worker, and this process writes
    every file, so ``skip_existing`` resumes a run made on any executor."""
    if not (attention or logit_lens):
        raise UsageError("nothing to extract: give --attention, --logit-lens or both")
    if top_k < 1:
        raise UsageError(f"--top-k {top_k}: use a positive number")
    variant_name, _ = experiment.variant(variant)
    paths = _response_paths(experiment, variant_name, prompt_set, limit)
    loaded = loaded or load_variant(experiment, variant_name)
    arch = resolve_arch(loaded.model)
    chosen = parse_layers(layers, arch.n_layers)
    records = _records(paths, loaded.model.get_input_embeddings().weight.shape[0])
    if attention:
        arch.attention_module(chosen[0])  # a family whose attention is unknown fails here
    if logit_lens:
        Lens(loaded.model, arch)  # ... and one whose final norm or unembedding is
    out_dir = viz_dir(experiment, variant_name, prompt_set)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _Plan(prompt_set, chosen, top_k, out_dir, arch, TokenText(loaded.tokenizer),
                 loaded.tokenizer.pad_token_id or 0, json_attention)
    source = VariantSource(experiment, variant_name)
    jobs = {"logit_lens": (logit_lens, _run_lens, LensJob(source, chosen, top_k=top_k,
                                                          pad=plan.pad, loaded=loaded)),
            "attention": (attention, _run_attention, AttentionJob(source, chosen, loaded=loaded))}
    written: list[Path] = []
    kept = 0
    for kind, (wanted, run, job) in jobs.items():
        if not wanted:
            continue
        todo = _todo(records, plan, kind, skip_existing)
        kept += len(records) - len(todo)
        with progress(total=len(records), desc=kind.replace("_", " "), unit="prompts",
                      initial=len(records) - len(todo)) as bar:
            written += run(executor or LocalExecutor(), job, plan, todo, bar)
    return VizResult(out_dir, written, kept)


if __name__ == "__main__":
    from residlab.cli import run_module

    raise SystemExit(run_module("extract-viz"))
