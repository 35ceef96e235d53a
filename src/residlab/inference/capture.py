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

from residlab.arch import Arch, resolve_arch
from residlab.errors import NotFound, UsageError
from residlab.experiments import Experiment, load_variant
from residlab.generation import padded_inputs
from residlab.hooks import Capture, intervene
from residlab.inference.raw import is_complete, save_raw, tensor_name
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
            if not -n_layers <= layer < n_layers:
                raise UsageError(f"--layers {spec!r}: layer {layer} is out of range for a "
                                 f"model with {n_layers} layers (0-{n_layers - 1})")
            layers.append(layer % n_layers)
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
    with torch.inference_mode(), intervene(model, list(captures.values()), arch=arch):
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
    return {"parts": part, "prompt_end": end, "response_only": response_only, **extra}


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def capture_prompt_set(
    experiment: Experiment, prompt_set: str, *, variant: str | None = None,
    responses_from: str | None = None, layers: str | None = None, capture_mlp: bool = False,
    response_only: bool = False, skip_existing: bool = False, dtype: str = "bf16",
    batch_size: int = 8, load_in_8bit: bool = False, load_in_4bit: bool = False, loaded=None,
    components: Sequence[str] | None = None,
) -> CaptureResult:
    """Capture every response JSON of a prompt set; one safetensors file per prompt.

    ``components`` overrides the seed's set (residual + attn_contribution, + mlp_contribution
    with ``capture_mlp``), e.g. ``["residual"]``.
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
    out_dir = experiment.raw_dir(variant_name, prompt_set)
    todo = [r for r in records
            if not (skip_existing and is_complete(out_dir / f"{r['id']}.safetensors"))]
    loaded = loaded or load_variant(experiment, variant_name, load_in_8bit=load_in_8bit,
                                    load_in_4bit=load_in_4bit)
    arch = resolve_arch(loaded.model)
    chosen = parse_layers(layers, arch.n_layers)
    if components is None:
        components = ["residual", "attn_contribution"] + (
            ["mlp_contribution"] if capture_mlp else [])
    unknown = set(components) - set(COMPONENT_SITES)
    if unknown or not components:
        raise UsageError(f"unknown component(s) {sorted(unknown)}; use {list(COMPONENT_SITES)}")
    extra = {"variant": variant_name, "prompt_set": prompt_set, "responses_from": source_variant,
             "layers": chosen, "components": components, "dtype": dtype}
    write_json(out_dir / "_provenance.json", {
        **extra, "model": loaded.provenance, "response_only": response_only,
        "libraries": library_versions(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    todo.sort(key=lambda r: len(r["token_ids"]))
    written = _run_batches(loaded, arch, todo, chosen, components, out_dir, response_only,
                           STORAGE_DTYPES[dtype], batch_size, extra)
    return CaptureResult(out_dir, written, len(records) - len(todo))


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
