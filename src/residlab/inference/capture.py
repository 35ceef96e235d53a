"""Capture raw activations by one prefill forward over each response JSON's exact token ids.

Per layer: ``residual`` (block output, resid_post), ``attn_contribution`` and, on request,
``mlp_contribution`` (what the attention / MLP sub-layers add to the residual). Only the model
body runs (no LM head). Batches are left-padded with counted position ids and the padding is
stripped before saving; on out-of-memory the batch is halved and the same prompts retried.

    python -m residlab.inference.capture_raw_activations --experiment E --prompt-set single_trait
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from residlab.arch import Arch, normalize_layer, resolve_arch
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment, load_variant
from residlab.generation import padded_inputs
from residlab.hooks import Capture, intervene
from residlab.inference.raw import Contents, contents, save_raw, tensor_name, token_hash
from residlab.inference.responses import read_response
from residlab.models import library_versions
from residlab.store import write_json

__all__ = ["COMPONENT_SITES", "CaptureResult", "capture_prompt_set", "capture_records",
           "parse_layers"]

log = logging.getLogger(__name__)
COMPONENT_SITES = {"residual": "resid_post", "attn_contribution": "attn_out",
                   "mlp_contribution": "mlp_out"}
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """``None``/``all`` -> every layer; ``25,27,30``; ``10-45:3`` (inclusive range, step)."""
    if spec in (None, "", "all"):
        return list(range(n_layers))
    layers: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(-?\d+)(?:\s*-\s*(\d+)(?::(\d+))?)?\s*", part)
        if not match:
            raise UsageError(f"--layers {spec!r}: cannot read {part!r}; use e.g. 25,27,30 or "
                             "10-45:3")
        first, last, step = match.groups()
        picked = (range(int(first), int(last) + 1, int(step or 1)) if last else [int(first)])
        for layer in picked:
            try:
                layers.append(normalize_layer(layer, n_layers))
            except UsageError as error:
                raise UsageError(f"--layers {spec!r}: {error}") from None
    if not layers:
        raise UsageError(f"--layers {spec!r} selects no layer")
    return sorted(set(layers))


def capture_records(
    model, arch: Arch, records: Sequence[dict], layers: Sequence[int],
    components: Sequence[str], *, pad_id: int, response_only: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict[str, torch.Tensor]]:
    """One forward over the records' token ids; per record, ``{tensor_name: [n, d]}``."""
    captures = {(layer, comp): Capture(layer, COMPONENT_SITES[comp])
                for layer in layers for comp in components}
    inputs = padded_inputs([r["token_ids"] for r in records], pad_id,
                           next(model.parameters()).device)
    with torch.inference_mode(), intervene(model, list(captures.values()), arch=arch,
                                           prompt_mask=inputs["attention_mask"]):
        arch.body(**inputs)
    width = inputs["input_ids"].shape[1]
    out = []
    for row, record in enumerate(records):
        start, end = width - len(record["token_ids"]), record["prompt_end"]
        tensors = {}
        for (layer, comp), capture in captures.items():
            values = capture.chunks[0][row, start:]  # (n_tokens, d), padding stripped
            parts = {"response": values[end:]} if response_only else {
                "prompt": values[:end], "response": values[end:]}
            for part, tensor in parts.items():
                tensors[tensor_name(part, layer, comp)] = tensor.to("cpu", dtype).clone()
        out.append(tensors)
    return out


@dataclass(frozen=True)
class CaptureResult:
    out_dir: Path
    written: list[Path]
    skipped: int


def _metadata(record: dict, response_only: bool, extra: dict) -> dict:
    ids, end, tokens = record["token_ids"], record["prompt_end"], record.get("tokens")
    tokens = tokens if isinstance(tokens, list) and len(tokens) == len(ids) else None
    part = {
        "prompt": {"text": record.get("prompt"), "token_ids": ids[:end],
                   "tokens": tokens[:end] if tokens else None},
        "response": {"text": record.get("response"), "token_ids": ids[end:],
                     "tokens": tokens[end:] if tokens else None},
    }
    if response_only:
        del part["prompt"]
    return {"parts": part, "prompt_end": end, "response_only": response_only,
            "token_ids_sha256": token_hash(ids), **extra}


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _components(components: Sequence[str] | None, capture_mlp: bool) -> list[str]:
    if components is None:
        components = ["residual", "attn_contribution"] + (
            ["mlp_contribution"] if capture_mlp else [])
    unknown = set(components) - set(COMPONENT_SITES)
    if unknown or not components:
        raise UsageError(f"unknown component(s) {sorted(unknown)}; use {list(COMPONENT_SITES)}")
    return list(components)


def capture_prompt_set(
    experiment: Experiment, prompt_set: str, *, variant: str | None = None,
    responses_from: str | None = None, layers: str | None = None, capture_mlp: bool = False,
    response_only: bool = False, skip_existing: bool = False, dtype: str = "bf16",
    batch_size: int = 8, load_in_8bit: bool = False, load_in_4bit: bool = False, loaded=None,
    components: Sequence[str] | None = None,
) -> CaptureResult:
    """Capture every response JSON of a prompt set; one safetensors file per prompt.

    ``components`` overrides the seed's set (residual + attn_contribution, + mlp_contribution
    with ``capture_mlp``), e.g. ``["residual"]``. ``skip_existing`` keeps a file only when it
    holds exactly what is asked (layers, components, response_only, dtype) over the response
    JSON's token ids; any other file is captured again (the reason is logged).
    """
    variant_name, _ = experiment.variant(variant)
    source_variant, _ = experiment.variant(responses_from or variant_name)
    source = experiment.responses_dir(source_variant, prompt_set)
    paths = sorted(source.glob("*.json"))
    if not paths:
        raise NotFound(f"no response JSONs in {source}; run 'residlab responses "
                          f"--experiment {experiment.name} --prompt-set {prompt_set} "
                          f"--model-variant {source_variant}' first")
    records = [read_response(path) | {"id": path.stem} for path in paths]
    components = _components(components, capture_mlp)
    out_dir = experiment.raw_dir(variant_name, prompt_set)
    loaded = loaded or load_variant(experiment, variant_name, load_in_8bit=load_in_8bit,
                                    load_in_4bit=load_in_4bit)
    arch = resolve_arch(loaded.model)
    asked = _Asked(tuple(parse_layers(layers, arch.n_layers)), tuple(components), response_only,
                   dtype, arch.n_layers, arch.family)
    todo = _to_capture(records, out_dir, asked) if skip_existing else list(records)
    extra = {"variant": variant_name, "prompt_set": prompt_set, "responses_from": source_variant,
             "layers": list(asked.layers), "components": components, "dtype": dtype,
             "response_only": response_only, "n_layers": arch.n_layers, "family": arch.family}
    _write_provenance(out_dir, extra, loaded.provenance, planned=asked if todo else None)
    todo.sort(key=lambda r: len(r["token_ids"]))
    written = _run_batches(loaded, arch, todo, list(asked.layers), components, out_dir,
                           response_only, STORAGE_DTYPES[dtype], batch_size, extra)
    _write_provenance(out_dir, extra, loaded.provenance)
    return CaptureResult(out_dir, written, len(records) - len(todo))


@dataclass(frozen=True)
class _Asked:
    """What a capture run writes into every file."""

    layers: tuple[int, ...]
    components: tuple[str, ...]
    response_only: bool
    dtype: str
    n_layers: int
    family: str

    def contents(self) -> Contents:
        parts = ("response",) if self.response_only else ("prompt", "response")
        names = frozenset(tensor_name(part, layer, component) for part in parts
                          for layer in self.layers for component in self.components)
        return Contents(names, frozenset({self.dtype}), None, None, self.n_layers, self.family)


def _short(values: Sequence) -> str:
    values = list(values)
    return str(values) if len(values) <= 8 else f"[{values[0]}..{values[-1]}] ({len(values)})"


def _difference(held: Contents | None, record: dict, asked: _Asked) -> str | None:
    """Why an existing file cannot be kept; ``None`` when it holds exactly what is asked."""
    if held is None:
        return "unreadable or truncated"
    want = asked.contents()
    if held.token_sha is None:
        return "it does not record which token ids it was captured over (older capture)"
    if held.token_sha != token_hash(record["token_ids"]):
        return "it was captured over other token ids than the response JSON now holds"
    if held.prompt_end != record["prompt_end"]:
        return f"its prompt ends at token {held.prompt_end}, not {record['prompt_end']}"
    if held.response_only != asked.response_only:
        return f"response_only is {held.response_only}, asked {asked.response_only}"
    if held.layers != want.layers:
        return f"it holds layers {_short(held.layers)}, asked {_short(want.layers)}"
    if held.components != want.components:
        return f"it holds {held.components}, asked {want.components}"
    if held.names != want.names:
        return "some of the asked (layer, component) tensors are missing"
    if held.dtypes != want.dtypes:
        return f"it is stored as {sorted(held.dtypes)}, asked {asked.dtype}"
    return None


def _to_capture(records: list[dict], out_dir: Path, asked: _Asked) -> list[dict]:
    """The records whose file is missing or differs from what is asked."""
    todo, redo = [], []
    for record in records:
        path = out_dir / f"{record['id']}.safetensors"
        why = _difference(contents(path), record, asked) if path.exists() else "new"
        if why is None:
            continue
        todo.append(record)
        if why != "new":
            log.info("capturing %s again: %s", path, why)
            redo.append(f"{path.name}: {why}")
    if redo:
        log.warning("capturing %d existing file(s) again because they differ from what is "
                    "asked, e.g. %s", len(redo), "; ".join(redo[:3]))
    return todo


def _held_by_all(held: list[Contents]) -> dict:
    """Layers and components that every file holds (each listed layer has each listed
    component), whether any file lacks prompt tokens, and the storage dtype."""
    if not held:
        return {"layers": [], "components": [], "response_only": None, "dtype": None}
    common = frozenset.intersection(*(h.pairs for h in held))
    components = sorted({component for _, component in common})
    layers = sorted({layer for layer, _ in common
                     if all((layer, component) in common for component in components)})
    dtypes = sorted(frozenset().union(*(h.dtypes for h in held)))
    return {"layers": layers, "components": components,
            "response_only": any(h.response_only for h in held),
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes}


def _write_provenance(out_dir: Path, extra: dict, model: dict,
                      planned: _Asked | None = None) -> None:
    """``_provenance.json`` claims only what every file of the folder holds (read from their
    headers; while a run is under way, also what it is about to write). What the latest run
    asked is kept apart, under ``last_run``; each file's own metadata stays authoritative."""
    held = [c for c in map(contents, sorted(out_dir.glob("*.safetensors"))) if c is not None]
    if planned is not None:
        held.append(planned.contents())
    last_run = {k: extra[k] for k in ("responses_from", "layers", "components", "dtype",
                                      "response_only")}
    write_json(out_dir / "_provenance.json", {
        "variant": extra["variant"], "prompt_set": extra["prompt_set"], "model": model,
        "n_layers": extra["n_layers"], "family": extra["family"], **_held_by_all(held),
        "last_run": last_run,
        "libraries": library_versions(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
    })


def _run_batches(loaded, arch, todo, layers, components, out_dir, response_only, dtype,
                 batch_size, extra) -> list[Path]:
    written: list[Path] = []
    pad = loaded.tokenizer.pad_token_id or 0
    progress = tqdm(total=len(todo), desc="capture", unit="prompt", disable=None)
    position = 0
    while position < len(todo):
        batch = todo[position:position + batch_size]
        try:
            tensors = capture_records(loaded.model, arch, batch, layers, components, pad_id=pad,
                                      response_only=response_only, dtype=dtype)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not _is_oom(error) or batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            log.warning("out of memory; retrying the same prompts with batch size %d", batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        for record, per_record in zip(batch, tensors, strict=True):
            path = out_dir / f"{record['id']}.safetensors"
            save_raw(path, per_record, _metadata(record, response_only,
                                                 {**extra, "id": record["id"]}))
            written.append(path)
        position += len(batch)
        progress.update(len(batch))
    progress.close()
    return written
