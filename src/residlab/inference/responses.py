"""Response JSONs: generate them with a variant (Mode A) or import texts (Mode B).

Each prompt becomes ``experiments/{exp}/inference/{variant}/responses/{prompt_set}/{id}.json``
holding the exact token ids (prompt + response) that capture later runs over. Mode B needs
only the tokenizer, no model weights.

    python -m residlab.inference.generate_responses --experiment E --prompt-set single_trait
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from residlab.errors import UsageError
from residlab.experiments import Experiment, load_variant
from residlab.generation import generate_ids
from residlab.hooks import Intervention
from residlab.inference.prompt_sets import PromptItem, load_prompt_set
from residlab.prompts import template_ids
from residlab.store import write_json

__all__ = ["generate_responses", "read_response", "response_record"]

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


def generate_responses(
    experiment: Experiment, prompt_set: str, *, variant: str | None = None,
    max_new_tokens: int = 50, temperature: float = 0.0, prefill: str | None = None,
    from_responses: str | Path | None = None, skip_existing: bool = False,
    limit: int | None = None, output_suffix: str | None = None, batch_size: int = 8,
    interventions: Sequence[Intervention] = (), tags: Sequence[str] = (), loaded=None,
) -> list[Path]:
    """Write one Response JSON per prompt; returns the files written."""
    items = load_prompt_set(prompt_set)[:limit]
    variant_name, spec = experiment.variant(variant)
    folder = prompt_set + (f"_{output_suffix}" if output_suffix else "")
    out_dir = experiment.responses_dir(variant_name, folder)
    imported = _imported(from_responses, items) if from_responses else None
    if imported is not None:
        items = [item for item in items if item.id in imported]
    todo = [i for i in items if not (skip_existing and (out_dir / f"{i.id}.json").is_file())]
    if not todo:
        return []
    model_name = spec.model + (f"+lora:{spec.lora}" if spec.lora else "")
    common = {"variant": variant_name, "prompt_set": prompt_set, "prefill": prefill}
    if imported is not None:
        from residlab.models import load_tokenizer

        tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
        imported_extra = {**common, "source": "imported", "finish_reason": None,
                          "max_new_tokens": None, "temperature": None}
        written = []
        for item in todo:
            prompt_ids, fill = _prompt_ids(tokenizer, item, prefill)
            text_ids = tokenizer(imported[item.id], add_special_tokens=False)["input_ids"]
            written.append(_save(out_dir, response_record(
                tokenizer, item, prompt_ids, fill + text_ids, model=model_name,
                extra=imported_extra, tags=tags)))
        return written
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


def _save(out_dir: Path, record: dict[str, Any]) -> Path:
    path = out_dir / f"{record['id']}.json"
    write_json(path, record)
    return path
