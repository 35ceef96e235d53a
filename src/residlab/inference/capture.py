"""Capture raw activations by one prefill forward over each response JSON's exact token ids.

Per layer: ``residual`` (block output, resid_post), ``attn_contribution`` and, on request,
``mlp_contribution`` (what the attention / MLP sub-layers add to the residual). Only the model
body runs (no LM head, no KV cache). Batches are left-padded with counted position ids and the
padding is stripped before saving; on out-of-memory the batch is halved and the same prompts
retried.

Memory is bounded by one batch, whatever the number of prompts: a batch's ``(B, T, D)``
captures are written one prompt at a time (each converted once, no other copy) and dropped
before the next forward. The default batch comes from a memory budget
(:func:`default_batch_size`). A prompt whose capture holds NaN or inf is not written.

    python -m residlab.inference.capture_raw_activations --experiment E --prompt-set single_trait
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from residlab.arch import Arch, normalize_layer, resolve_arch
from residlab.errors import NotFound, UsageError
from residlab.executors import Executor, Shard, ShardJob
from residlab.experiments import Experiment, load_variant
from residlab.generation import padded_inputs
from residlab.hooks import Capture, intervene
from residlab.inference.capture_folder import Asked, to_capture, write_provenance
from residlab.inference.capture_memory import default_batch_size, release_memory
from residlab.inference.jobs import owned
from residlab.inference.raw import save_raw, tensor_name, token_hash
from residlab.inference.responses import read_response
from residlab.progress import progress

__all__ = ["COMPONENT_SITES", "CaptureJob", "CaptureResult", "CapturedBatch", "capture_prompt_set",
           "capture_records", "default_batch_size", "parse_layers"]

log = logging.getLogger(__name__)
FinalHidden = Callable[[Sequence[dict], torch.Tensor], None]  # (records, (B, T, D) hidden)
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


class CapturedBatch(Sequence[dict[str, torch.Tensor]]):
    """Per-record ``{tensor_name: [n, d]}`` of one forward, built when a record is read.

    Nothing is copied up front: a record's tensors are slices of the batch's ``(B, T, D)``
    captures, moved and converted once (views when already on CPU in ``dtype``). Reading a
    record twice converts it twice. Drop the batch, and the records read from it, before the
    next forward so that two batches are never held at once.
    """

    def __init__(self, values: dict[tuple[int, str], torch.Tensor], records: Sequence[dict],
                 *, response_only: bool, dtype: torch.dtype):
        self._values = values  # (layer, component) -> (B, T, D)
        self._records = list(records)
        self._response_only = response_only
        self._dtype = dtype

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        row = range(len(self._records))[row]
        record = self._records[row]
        end = record["prompt_end"]
        tensors = {}
        for (layer, comp), batch in self._values.items():
            start = batch.shape[1] - len(record["token_ids"])
            values = batch[row, start:]  # (n_tokens, D), padding stripped
            parts = {"response": values[end:]} if self._response_only else {
                "prompt": values[:end], "response": values[end:]}
            for part, tensor in parts.items():
                tensors[tensor_name(part, layer, comp)] = tensor.to("cpu", self._dtype)
        return tensors

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self[row] for row in range(len(self._records)))


def capture_records(
    model, arch: Arch, records: Sequence[dict], layers: Sequence[int],
    components: Sequence[str], *, pad_id: int, response_only: bool = False,
    dtype: torch.dtype = torch.bfloat16, final_hidden: FinalHidden | None = None,
) -> CapturedBatch:
    """One forward over the records' token ids; per record, ``{tensor_name: [n, d]}``.

    The body runs without a KV cache: nothing reads it, and it would hold every layer's keys
    and values on top of the captures. ``final_hidden(records, hidden)`` is handed the body's
    final (normed) hidden states ``(B, T, D)`` of the left-padded batch, for a stage that
    needs them too (the model diff's log-probs) instead of running the body again."""
    captures = {(layer, comp): Capture(layer, COMPONENT_SITES[comp])
                for layer in layers for comp in components}
    inputs = padded_inputs([r["token_ids"] for r in records], pad_id,
                           next(model.parameters()).device)
    with torch.inference_mode(), intervene(model, list(captures.values()), arch=arch,
                                           prompt_mask=inputs["attention_mask"]):
        output = arch.body(**inputs, use_cache=False)
        if final_hidden is not None:
            final_hidden(records, output.last_hidden_state)  # (B, T, D)
        del output
    values = {key: capture.chunks[0] for key, capture in captures.items()}  # (B, T, D) each
    return CapturedBatch(values, records, response_only=response_only, dtype=dtype)


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
    batch_size: int | None = None, load_in_8bit: bool = False, load_in_4bit: bool = False,
    loaded=None, components: Sequence[str] | None = None, executor: Executor | None = None,
    final_hidden: FinalHidden | None = None,
) -> CaptureResult:
    """Capture every response JSON of a prompt set; one safetensors file per prompt.

    ``components`` overrides the seed's set (residual + attn_contribution, + mlp_contribution
    with ``capture_mlp``), e.g. ``["residual"]``. ``skip_existing`` keeps a file only when it
    holds exactly what is asked (layers, components, response_only, dtype) over the response
    JSON's token ids, all finite; any other file is captured again (the reason is logged).
    ``batch_size=None`` chooses the batch from a memory budget (:func:`default_batch_size`).
    A prompt whose capture holds NaN or inf is not written; the others are, then a UsageError
    names the first such prompt. A remote ``executor`` (Ray) captures the same batches on its
    workers; this process writes every file (:func:`_run_shards`). ``final_hidden``: see
    :func:`capture_records` (local runs only; it sees the prompts captured now, not the
    files kept).
    """
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: use a positive number, or leave it out "
                         "to choose from the memory budget")
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
    asked = Asked(tuple(parse_layers(layers, arch.n_layers)), tuple(components), response_only,
                   dtype, arch.n_layers, arch.family)
    todo = to_capture(records, out_dir, asked) if skip_existing else list(records)
    extra = {"variant": variant_name, "prompt_set": prompt_set, "responses_from": source_variant,
             "layers": list(asked.layers), "components": components, "dtype": dtype,
             "response_only": response_only, "n_layers": arch.n_layers, "family": arch.family}
    record = bool(todo) or not (out_dir / "_provenance.json").exists()  # a no-op rerun: keep
    if record:
        write_provenance(out_dir, extra, loaded.provenance, planned=asked if todo else None)
    todo.sort(key=lambda r: len(r["token_ids"]))
    if batch_size is None and todo:
        batch_size = _chosen_batch(loaded.model, arch, todo, asked)
    plan = _Plan(list(asked.layers), components, response_only, STORAGE_DTYPES[dtype], extra)
    if executor is not None and executor.remote:
        if final_hidden is not None:
            raise UsageError("final_hidden needs the local executor")
        job = CaptureJob(experiment, variant_name, plan, quantized=(load_in_8bit, load_in_4bit))
        written, failed = _run_shards(executor, job, loaded, todo, out_dir, batch_size or 1,
                                      done=len(records) - len(todo))
    else:
        written, failed = _run_batches(loaded, arch, todo, plan, out_dir, batch_size or 1,
                                       done=len(records) - len(todo), final_hidden=final_hidden)
    if record:
        write_provenance(out_dir, extra, loaded.provenance)
    if failed:
        raise UsageError(f"{len(failed)} of {len(todo)} prompt(s) not written because their "
                         f"capture holds NaN or inf, first {failed[0]}")
    return CaptureResult(out_dir, written, len(records) - len(todo))


def _chosen_batch(model, arch: Arch, todo: list[dict], asked: Asked) -> int:
    longest = max(len(r["token_ids"]) for r in todo)
    captured = len(asked.layers) * len(asked.components)
    batch, why = default_batch_size(model, arch, tokens=longest, captured=captured,
                                    limit=len(todo))
    log.info("capture: batch size %d, %s (give --batch-size to override)", batch, why)
    return batch


@dataclass(frozen=True)
class _Plan:
    """What every batch of one run captures and how it is stored."""

    layers: list[int]
    components: list[str]
    response_only: bool
    dtype: torch.dtype
    extra: dict


def _run_batches(loaded, arch: Arch, todo: list[dict], plan: _Plan, out_dir: Path,
                 batch_size: int, *, done: int = 0,
                 final_hidden: FinalHidden | None = None) -> tuple[list[Path], list[str]]:
    """Capture and write ``todo`` batch by batch (``done`` prompts were kept from before); the
    files written, and why prompts failed."""
    written: list[Path] = []
    failed: list[str] = []
    pad = loaded.tokenizer.pad_token_id or 0
    bar = progress(total=done + len(todo), desc="capture", unit="prompts", initial=done)
    position = 0
    while position < len(todo):
        batch = todo[position:position + batch_size]
        try:
            _capture_batch(loaded, arch, batch, plan, out_dir, pad, written, failed,
                           final_hidden)
            position += len(batch)
            bar.update(len(batch))
            release_memory()  # the batch is gone: nothing is held from here to the next
            continue
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not _is_oom(error) or batch_size == 1:
                raise
        batch_size = max(1, batch_size // 2)  # here the traceback, and the batch, are gone
        log.warning("out of memory; retrying the same prompts with batch size %d", batch_size)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    bar.close()
    return written, failed


class CaptureJob(ShardJob):
    """Capture on workers: a shard's payload is one batch of response records (the batches
    of a local run); its result is, per record, ``{tensor_name: tensor}`` owning its memory.
    The driver checks and writes each file, as a local run does."""

    local_only = ("loaded", "arch")

    def __init__(self, experiment: Experiment, variant: str, plan: _Plan, *,
                 quantized: tuple[bool, bool] = (False, False)):
        self.experiment, self.variant, self.plan, self.quantized = (experiment, variant, plan,
                                                                    quantized)
        self.loaded = self.arch = None

    def model_key(self) -> tuple:
        return (str(self.experiment.path), self.experiment.variant(self.variant), *self.quantized)

    def load(self):
        eight, four = self.quantized
        return load_variant(self.experiment, self.variant, load_in_8bit=eight,
                            load_in_4bit=four)

    def setup(self) -> None:
        super().setup()
        self.arch = self.arch or resolve_arch(self.loaded.model)

    def compute(self, payload: list[dict]) -> list[dict[str, torch.Tensor]]:
        """The batch's captures; on out-of-memory, its halves (and so on) one after another."""
        pad = self.loaded.tokenizer.pad_token_id or 0
        out: list[dict[str, torch.Tensor]] = []
        size = len(payload)
        while len(out) < len(payload):
            part = payload[len(out):len(out) + size]
            try:
                captured = capture_records(
                    self.loaded.model, self.arch, part, self.plan.layers, self.plan.components,
                    pad_id=pad, response_only=self.plan.response_only, dtype=self.plan.dtype)
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not _is_oom(error) or size == 1:
                    raise
                size = max(1, size // 2)
                continue
            out += [{name: owned(t) for name, t in tensors.items()} for tensors in captured]
            del captured
        return out


def _run_shards(executor: Executor, job: CaptureJob, loaded, todo: list[dict], out_dir: Path,
                batch_size: int, *, done: int = 0) -> tuple[list[Path], list[str]]:
    """Capture ``todo`` in batches on ``executor``'s workers; write each file here."""
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    shards = [Shard(i, batch, len(batch)) for i, batch in enumerate(batches)]
    written: dict[int, list[Path]] = {}  # by shard, so the lists come out in a local run's order
    failed: dict[int, list[str]] = {}

    def write(shard: Shard, captured: list[dict[str, torch.Tensor]]) -> None:
        failed[shard.key] = []
        paths = [_write_record(record, tensors, job.plan, out_dir, failed[shard.key],
                               loaded.model)
                 for record, tensors in zip(shard.payload, captured, strict=True)]
        written[shard.key] = [path for path in paths if path is not None]

    with progress(total=done + len(todo), desc="capture", unit="prompts", initial=done) as bar:
        executor.run(job, shards, write, bar=bar)
    return ([path for key in sorted(written) for path in written[key]],
            [why for key in sorted(failed) for why in failed[key]])


def _capture_batch(loaded, arch: Arch, batch: list[dict], plan: _Plan, out_dir: Path, pad: int,
                   written: list[Path], failed: list[str],
                   final_hidden: FinalHidden | None = None) -> None:
    """One forward, then one prompt at a time: convert, check, write, drop. Everything this
    batch holds is gone when the function returns."""
    captured = capture_records(loaded.model, arch, batch, plan.layers, plan.components,
                               pad_id=pad, response_only=plan.response_only, dtype=plan.dtype,
                               final_hidden=final_hidden)
    for row, record in enumerate(batch):
        path = _write_record(record, captured[row], plan, out_dir, failed, loaded.model)
        if path is not None:
            written.append(path)


def _write_record(record: dict, tensors: dict[str, torch.Tensor], plan: _Plan, out_dir: Path,
                  failed: list[str], model) -> Path | None:
    """Write one prompt's file, unless a tensor holds NaN or inf (then say why in ``failed``)."""
    bad = _first_nonfinite(tensors)
    if bad is not None:
        failed.append(_nonfinite_message(record["id"], bad, model, plan.dtype))
        log.error("not written: %s", failed[-1])
        return None
    path = out_dir / f"{record['id']}.safetensors"
    meta = {**plan.extra, "id": record["id"], "all_finite": True}
    save_raw(path, tensors, _metadata(record, plan.response_only, meta))
    return path


def _first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The tensor holding NaN or inf that is nearest to where they arose: the lowest layer,
    and there a contribution before the residual that sums it."""

    def order(name: str) -> tuple[int, bool]:
        _, layer, component = name.split(".")
        return int(layer.removeprefix("layer")), component == "residual"

    for name in sorted(tensors, key=order):
        if not torch.isfinite(tensors[name]).all():
            return name
    return None


def _nonfinite_message(prompt_id: str, name: str, model, dtype: torch.dtype) -> str:
    part, layer, component = name.split(".")
    model_dtype = getattr(model, "dtype", None)
    if model_dtype == torch.float16:
        fix = "the fp16 model overflows: load the variant in bf16 or fp32"
    elif dtype == torch.float16:
        fix = "values beyond the fp16 range: store with --dtype bf16 or fp32"
    else:
        fix = f"the {str(model_dtype).removeprefix('torch.')} model produced them: check it"
    return (f"prompt {prompt_id!r}, layer {layer.removeprefix('layer')} {component} "
            f"({part} tokens): {fix}, then rerun with --skip-existing")
