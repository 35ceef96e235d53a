"""Response JSONs: generate them with a variant (Mode A) or import texts (Mode B).

Each prompt becomes ``experiments/{exp}/inference/{variant}/responses/{prompt_set}/{id}.json``
holding the exact token ids (prompt + response) that capture later runs over. Mode B needs
only the tokenizer, no model weights. ``output_suffix`` writes to ``{prompt_set}_{suffix}``;
steered responses go to ``{prompt_set}_steer-{trait}-L{layer}-c{coef}`` unless a suffix is
given.

Every record says what made it: ``source`` (generated / imported), ``imported_sha256`` (of the
imported file), ``prefill``, ``max_new_tokens``, ``temperature``, ``generation_settings`` (the
effective ones, :func:`residlab.generation.effective_generation_settings`), ``steering`` and
``interventions`` (with sha256 of the added vectors), ``model_identity`` (model id, file or
config hash or hub revision, LoRA adapter, dtype; ``inference_model`` is its id), and the
effective ``system_prompt``: the prompt set's, or the default one a chat template adds
(``system_prompt_source`` says which).

A folder holds the responses of one setting. **Same settings** means equal values of the
record fields in :data:`SETTING_KEYS` (for steering: trait, layer used, coefficient, vector
identity and hash). The date, batch size, device and library versions are not part of it.
Writing into a folder that holds responses of other settings is refused, naming
``--output-suffix`` (which keeps both). With ``skip_existing`` a file is kept when its settings
are the same and its prompt tokens are what the prompt set and chat template give today;
other files of this run are made again, each logged with the reason. Responses of other
settings that the run would not redo (beyond ``limit``, not imported) are refused as well.

    python -m residlab.inference.generate_responses --experiment E --prompt-set single_trait
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from residlab.errors import UsageError
from residlab.executors import Executor, Shard
from residlab.executors.local import LocalExecutor
from residlab.experiments import Experiment, load_variant
from residlab.generation import GenerationDefaults
from residlab.hooks import Intervention
from residlab.inference.jobs import LocalModel, ResponsesJob, VariantSource
from residlab.inference.prompt_sets import PromptItem, load_prompt_set
from residlab.outputs import UNRECORDED, Existing, differing_setting, keep_or_refuse, tensor_sha256
from residlab.progress import progress
from residlab.prompts import template_ids
from residlab.store import write_json

if TYPE_CHECKING:
    from residlab.traits.steer import Steering

__all__ = ["SETTING_KEYS", "Existing", "differing_setting", "effective_system_prompt",
           "generate_responses", "keep_or_refuse", "read_response", "response_record",
           "response_settings", "steered_folder", "tensor_sha256"]

log = logging.getLogger(__name__)

FIELDS = ("prompt", "response", "system_prompt", "tokens", "token_ids", "prompt_end",
          "inference_model", "prompt_note", "capture_date", "tags")
SETTING_KEYS = ("steering", "interventions", "interventions_sha256", "source", "imported_sha256",
                "prefill", "max_new_tokens", "temperature", "generation_settings",
                "model_identity")
IDENTITY_KEYS = ("model", "source", "file", "sha256", "config_sha256", "revision", "lora", "dtype")
STEERING_KEYS = ("trait", "layer", "coefficient", "vector", "vector_sha256")
_PROBE = "RESIDLAB-SYSTEM-PROMPT-PROBE"


def response_record(
    tokenizer, item: PromptItem, prompt_ids: list[int], response_ids: list[int], *,
    model: str, extra: dict[str, Any], tags: Sequence[str] = (),
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """The Response JSON (the seed's fields first, then ours). ``system_prompt`` is the
    effective one (default: the prompt set's)."""
    ids = list(prompt_ids) + list(response_ids)
    special = set(tokenizer.all_special_ids)
    return {
        "prompt": item.prompt,
        "response": tokenizer.decode([t for t in response_ids if t not in special]),
        "system_prompt": system_prompt if system_prompt is not None else item.system_prompt,
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


# --- what made a response ------------------------------------------------------------------

def effective_system_prompt(tokenizer, item: PromptItem,
                            text: str) -> tuple[str | None, str | None]:
    """``(system prompt, where from)`` as the rendered prompt ``text`` holds it: the prompt
    set's, the default a chat template adds when none is given (SmolLM2's "You are a helpful
    AI assistant named SmolLM..."), or ``(None, None)``."""
    if item.system_prompt:
        return item.system_prompt, "prompt set"
    default = _template_default(tokenizer, item.prompt, text)
    return (default, "chat template") if default else (None, None)


def _template_default(tokenizer, prompt: str, text: str) -> str | None:
    """What stands in ``text`` where a given system prompt would stand: the template is
    rendered with a probe system prompt, and ``text`` is read between the probe's neighbours."""
    messages = [{"role": "system", "content": _PROBE}, {"role": "user", "content": prompt}]
    try:
        probe = tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True)
    except Exception:  # a template that refuses a system turn adds none either
        return None
    if not isinstance(probe, str) or probe.count(_PROBE) != 1:
        return None
    head, tail = probe.split(_PROBE)
    if len(text) < len(head) + len(tail) or not (text.startswith(head) and text.endswith(tail)):
        return None
    return text[len(head):len(text) - len(tail)] or None


def _identity(provenance: dict[str, Any], fallback: str, lora: str | None) -> dict[str, Any]:
    """The model's identity for records: id, hash or revision, adapter, dtype."""
    identity = {key: provenance[key] for key in IDENTITY_KEYS if provenance.get(key) is not None}
    identity.setdefault("model", fallback)
    if lora:
        identity.setdefault("lora", lora)
    return identity


def _model_name(identity: dict[str, Any]) -> str:
    lora = identity.get("lora")
    return str(identity["model"]) + (f"+lora:{lora}" if lora else "")


def response_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``record`` that make "same settings" (missing ones are ``UNRECORDED``),
    as they read back from a file."""
    settings = {key: record.get(key, UNRECORDED) for key in SETTING_KEYS}
    if isinstance(settings["steering"], list):
        settings["steering"] = [{key: s.get(key) for key in STEERING_KEYS}
                                for s in settings["steering"] if isinstance(s, dict)]
    return json.loads(json.dumps(settings))


# --- folders --------------------------------------------------------------------------------

def steered_folder(prompt_set: str, steering: Sequence[Steering]) -> str:
    """``baseline_steer-emotion-optimism-L29-c8`` (specs joined by ``+``): the layers are the
    ones actually used."""
    specs = [f"{s.trait.replace('/', '-')}-L{s.layer}-c{s.coefficient:g}" for s in steering]
    return f"{prompt_set}_steer-{'+'.join(specs)}"


def _out_folder(prompt_set: str, output_suffix: str | None, steering, intervened) -> str:
    if output_suffix:
        return f"{prompt_set}_{output_suffix}"
    if steering:
        return steered_folder(prompt_set, steering)
    if intervened:
        raise UsageError("responses made under interventions need their own folder: pass "
                         "output_suffix (or steering=, which names the folder)")
    return prompt_set


def _examine(path: Path, ours: dict[str, Any], prompt_ids: list[int] | None) -> Existing:
    try:
        record = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return Existing("stale", "it is not readable JSON")
    if not isinstance(record, dict):
        return Existing("stale", "it is not a response record")
    differs = differing_setting(response_settings(record), ours)
    if differs:
        return Existing("settings", *differs)
    ids, end = record.get("token_ids"), record.get("prompt_end")
    if prompt_ids is not None and (not isinstance(ids, list) or not isinstance(end, int)
                                   or ids[:end] != prompt_ids):
        return Existing("stale", "its prompt tokens differ from what the prompt set and chat "
                                 "template give now")
    return Existing("same")


def _plan(out_dir: Path, items: list[PromptItem], prompt_ids: dict[str, list[int]],
          ours: dict[str, Any], skip_existing: bool) -> tuple[list[PromptItem], int]:
    """``(items to write, files kept)``, after :func:`keep_or_refuse`."""
    paths = sorted(out_dir.glob("*.json")) if out_dir.is_dir() else []
    found = {p.stem: _examine(p, ours, prompt_ids.get(p.stem)) for p in paths}
    keep = keep_or_refuse(out_dir, found, prompt_ids, skip_existing, "responses")
    return [item for item in items if item.id not in keep], len(keep)


# --- the two modes ----------------------------------------------------------------------------

class _Prompt(NamedTuple):
    ids: list[int]  # the templated prompt
    fill: list[int]  # the prefill's ids (the start of the response)
    system: str | None  # the effective system prompt
    system_source: str | None


def _prompt(tokenizer, item: PromptItem, prefill: str | None) -> _Prompt:
    text, ids = template_ids(tokenizer, item.messages())
    extra = tokenizer(prefill, add_special_tokens=False)["input_ids"] if prefill else []
    return _Prompt(ids, list(extra), *effective_system_prompt(tokenizer, item, text))


def _imported(path: str | Path, items: list[PromptItem]) -> tuple[dict[str, str], str]:
    """The ``{prompt_id: text}`` map of a Mode B file and the file's sha256."""
    try:
        data = Path(path).read_bytes()
        texts = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"--from-responses {path}: not a readable JSON file ({error})") from None
    if not isinstance(texts, dict) or not all(isinstance(v, str) for v in texts.values()):
        raise UsageError(f"--from-responses {path}: expected a {{prompt_id: response_text}} map")
    known = {item.id for item in items}
    missing = sorted(set(map(str, texts)) - known)
    if missing:
        raise UsageError(f"--from-responses {path}: ids not in the prompt set: "
                         f"{', '.join(missing[:10])}")
    return {str(key): value for key, value in texts.items()}, hashlib.sha256(data).hexdigest()


def _describe_intervention(intervention: Intervention) -> dict[str, Any]:
    return {"kind": type(intervention).__name__, "layer": intervention.layer,
            "site": intervention.site, "positions": intervention.positions}


def _intervention_sha(intervention: Intervention) -> str | None:
    vectors = getattr(intervention, "vectors", None)
    return tensor_sha256(vectors) if isinstance(vectors, torch.Tensor) else None


class _Job(NamedTuple):
    """Where and how this run writes."""

    out_dir: Path
    tags: list[str]
    skip_existing: bool
    batch_size: int


def generate_responses(
    experiment: Experiment, prompt_set: str, *, variant: str | None = None,
    max_new_tokens: int = 50, temperature: float = 0.0, prefill: str | None = None,
    from_responses: str | Path | None = None, skip_existing: bool = False,
    limit: int | None = None, output_suffix: str | None = None, batch_size: int = 8,
    interventions: Sequence[Intervention] = (), tags: Sequence[str] = (), loaded=None,
    steering: Sequence[Steering] = (), generation_defaults: GenerationDefaults = "plain",
    remote=None, executor: Executor | None = None, load_in_8bit: bool = False,
    load_in_4bit: bool = False,
) -> list[Path]:
    """Write one Response JSON per prompt; returns the files written.

    ``steering`` (from :func:`residlab.traits.steer.resolve_steering`) adds its vectors, tags
    each record ``steer:TRAIT:LAYER:COEF`` with the layer actually used, records the request
    under ``steering``, and names the folder unless ``output_suffix`` is given.
    ``generation_defaults`` is passed to :func:`residlab.generation.generate_ids`.
    ``remote`` (a :class:`residlab.client.RemoteModel`) generates through a model server
    instead of ``loaded``: the same batches and ``generate_ids`` settings, so the same files.
    ``executor`` generates the batches (default: this process); a remote one (Ray) loads the
    variant on each worker (``load_in_8bit`` / ``load_in_4bit`` as given here) while this
    process writes every file, so ``skip_existing`` resumes a run made on any executor."""
    if remote is not None and executor is not None and executor.remote:
        raise UsageError("a model server and a Ray executor both generate: use one of them")
    if from_responses and executor is not None and executor.remote:
        raise UsageError("--from-responses only tokenizes texts (no model runs): drop "
                         "--executor ray")
    interventions = [*interventions, *(s.intervention for s in steering)]
    tags = [*tags, *(s.tag for s in steering)]
    if from_responses and interventions:
        raise UsageError("steering needs generation; drop --from-responses or --steer")
    items = load_prompt_set(prompt_set)[:limit]
    variant_name, spec = experiment.variant(variant)
    out_dir = experiment.responses_dir(variant_name, _out_folder(
        prompt_set, output_suffix, steering, bool(interventions)))
    common = {"variant": variant_name, "prompt_set": prompt_set, "prefill": prefill,
              "steering": [{**s.record(), "vector_sha256": tensor_sha256(s.intervention.vectors)}
                           for s in steering],
              "interventions": [_describe_intervention(i) for i in interventions],
              "interventions_sha256": [_intervention_sha(i) for i in interventions]}
    job = _Job(out_dir, tags, skip_existing, batch_size)
    if from_responses:
        imported, sha = _imported(from_responses, items)
        items = [item for item in items if item.id in imported]
        common |= {"source": "imported", "imported_from": str(from_responses),
                   "imported_sha256": sha}
        return _import(spec, items, imported, prefill, common, job)
    model = remote if remote is not None else LocalModel(
        loaded or load_variant(experiment, variant_name, load_in_8bit=load_in_8bit,
                               load_in_4bit=load_in_4bit))
    gen = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0,
           "temperature": temperature if temperature > 0 else 1.0,
           "generation_defaults": generation_defaults}
    common |= _generated_fields(model, spec, gen, temperature)
    source = VariantSource(experiment, variant_name, load_in_8bit, load_in_4bit)
    responses_job = ResponsesJob(source, gen, interventions, model=model)
    return _generate(responses_job, items, prefill, common, job, executor or LocalExecutor())


def _generated_fields(model, spec, gen: dict[str, Any], temperature: float) -> dict[str, Any]:
    """What Mode A records beyond the common fields: the model that really ran and the
    generation settings in effect (same arguments as the ``generate_ids`` call)."""
    provenance = model.provenance or {}
    lora = provenance.get("lora") if provenance else spec.lora
    return {"source": "generated", "imported_from": None, "imported_sha256": None,
            "max_new_tokens": gen["max_new_tokens"], "temperature": temperature,
            "generation_settings": model.generation_settings(**gen),
            "model_identity": _identity(provenance, spec.model, lora)}


def _generate(model_job: ResponsesJob, items, prefill, common, job: _Job,
              executor: Executor) -> list[Path]:
    """Mode A: generate in batches (after the folder check) on ``executor``; this process
    saves each finished batch's records."""
    tokenizer = model_job.model.tokenizer
    prompts = {item.id: _prompt(tokenizer, item, prefill) for item in items}
    todo, kept = _plan(job.out_dir, items, {k: p.ids for k, p in prompts.items()},
                       response_settings(common), job.skip_existing)
    if not todo:
        return []
    batches = [todo[start:start + job.batch_size] for start in range(0, len(todo), job.batch_size)]
    shards = [Shard(key, [prompts[item.id].ids + prompts[item.id].fill for item in batch],
                    len(batch)) for key, batch in enumerate(batches)]
    written: dict[int, list[Path]] = {}  # by batch, so the list comes out in a local run's order

    def save(shard: Shard, outputs) -> None:
        written[shard.key] = [
            _save(job, tokenizer, item, prompts[item.id],
                  prompts[item.id].fill + out.token_ids,
                  {**common, "finish_reason": out.finish_reason})
            for item, out in zip(batches[shard.key], outputs, strict=True)]

    with progress(total=len(items), desc="responses", unit="prompts", initial=kept) as bar:
        executor.run(model_job, shards, save, bar=bar)
    return [path for key in sorted(written) for path in written[key]]


def _import(spec, items, imported, prefill, common, job: _Job) -> list[Path]:
    """Mode B: the given texts, tokenised after the prompt (tokenizer only, no weights)."""
    from residlab.models import load_tokenizer, model_source

    path, provenance = model_source(spec.model)  # the model's identity without loading weights
    tokenizer = load_tokenizer(path, trust_remote_code=spec.trust_remote_code)
    common = {**common, "max_new_tokens": None, "temperature": None,
              "generation_settings": None,
              "model_identity": _identity(provenance, spec.model, spec.lora)}
    prompts = {item.id: _prompt(tokenizer, item, prefill) for item in items}
    todo, kept = _plan(job.out_dir, items, {k: p.ids for k, p in prompts.items()},
                       response_settings(common), job.skip_existing)
    if not todo:
        return []
    written = []
    with progress(total=len(items), desc="responses", unit="prompts", initial=kept) as bar:
        for item in todo:
            row = prompts[item.id]
            text_ids = tokenizer(imported[item.id], add_special_tokens=False)["input_ids"]
            written.append(_save(job, tokenizer, item, row, row.fill + list(text_ids),
                                 {**common, "finish_reason": None}))
            bar.update(1)
    return written


def _save(job: _Job, tokenizer, item: PromptItem, prompt: _Prompt, response_ids: list[int],
          extra: dict[str, Any]) -> Path:
    record = response_record(
        tokenizer, item, prompt.ids, response_ids, model=_model_name(extra["model_identity"]),
        extra={**extra, "system_prompt_source": prompt.system_source}, tags=job.tags,
        system_prompt=prompt.system)
    path = job.out_dir / f"{item.id}.json"
    write_json(path, record)
    return path
