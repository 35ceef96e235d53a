"""Response JSONs: generate them with a variant (Mode A) or import texts (Mode B).

Each prompt becomes ``experiments/{exp}/inference/{variant}/responses/{prompt_set}/{id}.json``
holding the exact token ids (prompt + response) that capture later runs over. Mode B needs
only the tokenizer, no model weights. Steered responses go to a folder of their own
(``{prompt_set}_steer-{trait}-L{layer}-c{coef}`` unless ``output_suffix`` names one), and no
folder ever mixes responses made under different steering.

    python -m residlab.inference.generate_responses --experiment E --prompt-set single_trait
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from residlab.errors import UsageError
from residlab.experiments import Experiment, load_variant
from residlab.generation import generate_ids
from residlab.hooks import Intervention
from residlab.inference.prompt_sets import PromptItem, load_prompt_set
from residlab.prompts import template_ids
from residlab.store import write_json

if TYPE_CHECKING:
    from residlab.traits.steer import Steering

__all__ = ["generate_responses", "read_response", "response_record", "steered_folder"]

FIELDS = ("prompt", "response", "system_prompt", "tokens", "token_ids", "prompt_end",
          "inference_model", "prompt_note", "capture_date", "tags")


def response_record(
    tokenizer, item: PromptItem, prompt_ids: list[int], response_ids: list[int], *,
    model: str, extra: dict[str, Any], tags: Sequence[str] = (),
) -> dict[str, Any]:
    """The Response JSON (the seed's fields first, then ours)."""
    ids = list(prompt_ids) + list(response_ids)
    special = set(tokenizer.all_special_ids)
    return {
        "prompt": item.prompt,
        "response": tokenizer.decode([t for t in response_ids if t not in special]),
        "system_prompt": item.system_prompt,
        "tokens": [tokenizer.decode([token]) for token in ids],
        "token_ids": ids,
        "prompt_end": len(prompt_ids),
        "inference_model": model,
        "prompt_note": item.note,
        "capture_date": datetime.now(UTC).isoformat(timespec="seconds"),
        "tags": list(tags),
        "id": item.id,
        **extra,
    }


def read_response(path: Path) -> dict[str, Any]:
    """A response JSON, checked enough for capture to trust its token ids."""
    try:
        record = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: not a readable response JSON ({error})") from None
    ids, end = record.get("token_ids"), record.get("prompt_end")
    if (not isinstance(ids, list) or not all(isinstance(t, int) for t in ids)
            or not isinstance(end, int) or not 0 < end <= len(ids)):
        raise UsageError(f"{path}: needs 'token_ids' (list of ints) and 'prompt_end' within it")
    return record


def _prompt_ids(tokenizer, item: PromptItem, prefill: str | None) -> tuple[list[int], list[int]]:
    _, ids = template_ids(tokenizer, item.messages())
    extra = tokenizer(prefill, add_special_tokens=False)["input_ids"] if prefill else []
    return ids, list(extra)


def _imported(path: str | Path, items: list[PromptItem]) -> dict[str, str]:
    try:
        texts = json.loads(Path(path).read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"--from-responses {path}: not a readable JSON file ({error})") from None
    if not isinstance(texts, dict) or not all(isinstance(v, str) for v in texts.values()):
        raise UsageError(f"--from-responses {path}: expected a {{prompt_id: response_text}} map")
    known = {item.id for item in items}
    missing = sorted(set(map(str, texts)) - known)
    if missing:
        raise UsageError(f"--from-responses {path}: ids not in the prompt set: "
                         f"{', '.join(missing[:10])}")
    return {str(key): value for key, value in texts.items()}


def steered_folder(prompt_set: str, steering: Sequence[Steering]) -> str:
    """``baseline_steer-emotion-optimism-L29-c8`` (specs joined by ``+``): the layers are the
    ones actually used."""
    specs = [f"{s.trait.replace('/', '-')}-L{s.layer}-c{s.coefficient:g}" for s in steering]
    return f"{prompt_set}_steer-{'+'.join(specs)}"


def _describe(intervention: Intervention) -> dict[str, Any]:
    return {"kind": type(intervention).__name__, "layer": intervention.layer,
            "site": intervention.site, "positions": intervention.positions}


def _steer_tags(tags: Sequence[str]) -> list[str]:
    return sorted(t for t in tags if str(t).startswith("steer:"))


def _check_folder(out_dir: Path, tags: Sequence[str], intervened: bool) -> None:
    """Refuse to add responses to a folder whose responses were made under other steering
    (or none): each folder holds one condition only."""
    existing = next(iter(sorted(out_dir.glob("*.json"))), None) if out_dir.is_dir() else None
    if existing is None:
        return
    try:
        record = json.loads(existing.read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    theirs = _steer_tags(record.get("tags") or [])
    there = bool(theirs or record.get("interventions"))
    if (theirs, there) != (_steer_tags(tags), intervened):
        raise UsageError(f"{out_dir} holds responses made with {theirs or 'no steering'} "
                         f"({existing.name}); this run uses {_steer_tags(tags) or 'no steering'}"
                         ": pick another output suffix")


def _out_folder(prompt_set: str, output_suffix: str | None, steering, intervened) -> str:
    if output_suffix:
        return f"{prompt_set}_{output_suffix}"
    if steering:
        return steered_folder(prompt_set, steering)
    if intervened:
        raise UsageError("responses made under interventions need their own folder: pass "
                         "output_suffix (or steering=, which names the folder)")
    return prompt_set


def generate_responses(
    experiment: Experiment, prompt_set: str, *, variant: str | None = None,
    max_new_tokens: int = 50, temperature: float = 0.0, prefill: str | None = None,
    from_responses: str | Path | None = None, skip_existing: bool = False,
    limit: int | None = None, output_suffix: str | None = None, batch_size: int = 8,
    interventions: Sequence[Intervention] = (), tags: Sequence[str] = (), loaded=None,
    steering: Sequence[Steering] = (),
) -> list[Path]:
    """Write one Response JSON per prompt; returns the files written.

    ``steering`` (from :func:`residlab.traits.steer.resolve_steering`) adds its vectors, tags
    each record ``steer:TRAIT:LAYER:COEF`` with the layer actually used, records the request
    under ``steering``, and names the folder unless ``output_suffix`` is given."""
    interventions = [*interventions, *(s.intervention for s in steering)]
    tags = [*tags, *(s.tag for s in steering)]
    if from_responses and interventions:
        raise UsageError("steering needs generation; drop --from-responses or --steer")
    items = load_prompt_set(prompt_set)[:limit]
    variant_name, spec = experiment.variant(variant)
    out_dir = experiment.responses_dir(variant_name, _out_folder(
        prompt_set, output_suffix, steering, bool(interventions)))
    _check_folder(out_dir, tags, bool(interventions))
    imported = _imported(from_responses, items) if from_responses else None
    if imported is not None:
        items = [item for item in items if item.id in imported]
    todo = [i for i in items if not (skip_existing and (out_dir / f"{i.id}.json").is_file())]
    if not todo:
        return []
    model_name = spec.model + (f"+lora:{spec.lora}" if spec.lora else "")
    common = {"variant": variant_name, "prompt_set": prompt_set, "prefill": prefill,
              "steering": [s.record() for s in steering],
              "interventions": [_describe(i) for i in interventions]}
    if imported is not None:
        return _import(spec, todo, imported, out_dir, prefill, model_name, common, tags)
    loaded = loaded or load_variant(experiment, variant_name)
    written = []
    for start in tqdm(range(0, len(todo), batch_size), desc="responses", disable=None):
        batch = todo[start:start + batch_size]
        prompts = [_prompt_ids(loaded.tokenizer, item, prefill) for item in batch]
        outputs = generate_ids(
            loaded.model, loaded.tokenizer, [p + f for p, f in prompts],
            max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0, interventions=interventions)
        for item, (prompt_ids, fill), out in zip(batch, prompts, outputs, strict=True):
            written.append(_save(out_dir, response_record(
                loaded.tokenizer, item, prompt_ids, fill + out.token_ids, model=model_name,
                extra={**common, "source": "generated", "finish_reason": out.finish_reason,
                       "max_new_tokens": max_new_tokens, "temperature": temperature},
                tags=tags)))
    return written


def _import(spec, todo, imported, out_dir, prefill, model_name, common, tags) -> list[Path]:
    """Mode B: the given texts, tokenised after the prompt (tokenizer only)."""
    from residlab.models import load_tokenizer

    tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    extra = {**common, "source": "imported", "finish_reason": None, "max_new_tokens": None,
             "temperature": None}
    written = []
    for item in todo:
        prompt_ids, fill = _prompt_ids(tokenizer, item, prefill)
        text_ids = tokenizer(imported[item.id], add_special_tokens=False)["input_ids"]
        written.append(_save(out_dir, response_record(
            tokenizer, item, prompt_ids, fill + text_ids, model=model_name, extra=extra,
            tags=tags)))
    return written


def _save(out_dir: Path, record: dict[str, Any]) -> Path:
    path = out_dir / f"{record['id']}.json"
    write_json(path, record)
    return path
