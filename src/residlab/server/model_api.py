"""The model-server routes: health, model loading, and generation (plain, steered, captured).

Every route that touches the model runs in a worker thread under ``state.model_lock``
(:func:`run_locked`), so the event loop keeps answering ``/health`` and streams while a
generation runs, and requests take the model one at a time. ``POST /generate/ids`` is the
exact ``generate_ids`` call of ``residlab responses`` Mode A (token ids in, new ids out), and
``POST /generate/settings`` the matching ``effective_generation_settings``, so responses made
through the server are the files a local run writes.

``POST /model/load`` loads one model at a time (a second load meanwhile is 409), loads the
served experiment's variants, and loads any hub id or server path only when the server was
started with ``--allow-model-load`` (403 otherwise). A request may ask for at most
:data:`MAX_BATCH_TOKENS` new tokens over all its prompts (422), and ``/generate/with-capture``
refuses (413) an answer estimated over :data:`MAX_CAPTURE_ANSWER_BYTES`.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from residlab.errors import UsageError
from residlab.generation import GenerationDefaults, effective_generation_settings, generate_ids
from residlab.hooks import Add, Intervention
from residlab.options import DType, StorageDType
from residlab.server.state import ServerState
from residlab.server.tasks import active_tasks

__all__ = ["MAX_BATCH_TOKENS", "MAX_CAPTURE_ANSWER_BYTES", "MAX_NEW_TOKENS", "MAX_PROMPTS",
           "capture_answer_bytes", "health", "model_router", "run_locked"]

T = TypeVar("T")
MAX_PROMPTS = 64  # prompts per request
MAX_NEW_TOKENS = 8192
MAX_BATCH_TOKENS = 131_072  # prompts x max_new_tokens per request (16 x 8192, 64 x 2048)
MAX_CAPTURE_ANSWER_BYTES = 256 * 2**20  # base64 activations in one /generate/with-capture answer
SAFETENSORS_ENTRY_BYTES = 256  # header bytes per tensor, generously
Component = Literal["residual", "attn_contribution", "mlp_contribution"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoadRequest(_Strict):
    variant: str | None = Field(None, description="a variant of the served experiment")
    model: str | None = Field(None, description="hub id, local folder or 'default' (no "
                              "experiment needed; the server needs --allow-model-load)")
    dtype: DType = Field("bf16", description="with 'model' only (a variant has its own)")
    device: str = Field("auto", description="with 'model' only")


def _check_batch_tokens(n_prompts: int, max_new_tokens: int) -> None:
    if n_prompts * max_new_tokens > MAX_BATCH_TOKENS:
        raise ValueError(f"{n_prompts} prompts x max_new_tokens={max_new_tokens} is over "
                         f"{MAX_BATCH_TOKENS} new tokens per request; send fewer prompts per "
                         "request or lower max_new_tokens")


class GenerationSettings(_Strict):
    max_new_tokens: int = Field(50, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0, le=100, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    generation_defaults: GenerationDefaults = "plain"

    def gen(self) -> dict[str, Any]:
        """The ``generate_ids`` keywords, as ``residlab responses`` builds them."""
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0,
                "temperature": self.temperature if self.temperature > 0 else 1.0,
                "top_p": self.top_p, "generation_defaults": self.generation_defaults}


class IdsSettings(_Strict):
    """``generate_ids``' own keywords, passed through unchanged."""

    max_new_tokens: int = Field(..., ge=1, le=MAX_NEW_TOKENS)
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    generation_defaults: GenerationDefaults = "plain"


class IdsRequest(IdsSettings):
    prompts: list[list[int]] = Field(..., min_length=1, max_length=MAX_PROMPTS)

    @model_validator(mode="after")
    def _batch_tokens(self) -> IdsRequest:
        _check_batch_tokens(len(self.prompts), self.max_new_tokens)
        return self


class GenerateRequest(GenerationSettings):
    prompt: str | list[str] = Field(..., description="one prompt or a batch")
    system_prompt: str | None = None
    chat_template: bool = Field(True, description="false: the text is tokenised as it is")

    @model_validator(mode="after")
    def _batch_tokens(self) -> GenerateRequest:
        _check_batch_tokens(1 if isinstance(self.prompt, str) else len(self.prompt),
                            self.max_new_tokens)
        return self

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise UsageError(f"give 1 to {MAX_PROMPTS} prompts per request")
        return prompts


class SteerSpec(_Strict):
    trait: str = Field(..., description="category/trait with extracted vectors")
    layer: int | Literal["best"] = "best"
    coefficient: float


class RawVector(_Strict):
    layer: int
    vector: list[float] = Field(..., min_length=1)
    coefficient: float = Field(1.0, description="added: coefficient x vector / |vector|")


class SteeringRequest(GenerateRequest):
    steering: list[SteerSpec] = Field(default_factory=list)
    vectors: list[RawVector] = Field(default_factory=list)


class CaptureGenerateRequest(GenerateRequest):
    layers: str | None = Field(None, description="e.g. 1,3 or 0-3 (default: all)")
    components: list[Component] = Field(default_factory=lambda: ["residual"], min_length=1)
    dtype: StorageDType = "fp32"


def _loaded(state: ServerState):
    if state.loaded is None:
        raise HTTPException(409, "no model is loaded; POST /model/load first")
    return state.loaded


async def run_locked(state: ServerState, work: Callable[..., T], *args: Any) -> T:
    """``work(loaded, *args)`` in a worker thread, holding the model lock."""
    def locked() -> T:
        with state.model_lock:
            return work(_loaded(state), *args)

    return await run_in_threadpool(locked)


def health(state: ServerState) -> dict[str, Any]:
    """``GET /health``: what is served (no lock: answers while the model is busy)."""
    loaded = state.loaded
    arch = _arch(state) if loaded is not None else None
    return {
        "status": "ok",
        "model": None if loaded is None else loaded.provenance.get("model", loaded.name),
        "variant": state.variant,
        "loaded": loaded is not None,
        "n_layers": arch.n_layers if arch else None,
        "hidden_dim": arch.d_model if arch else None,
        "device": None if loaded is None else str(loaded.device),
        "dtype": None if loaded is None else str(loaded.dtype).removeprefix("torch."),
        "active_tasks": active_tasks(state),
        "active_streams": state.active_streams,
    }


def _arch(state: ServerState):
    from residlab.arch import resolve_arch

    if "server.arch" not in state.cache:
        state.cache["server.arch"] = resolve_arch(state.loaded.model)
    return state.cache["server.arch"]


def _check_device(device: str) -> None:
    """Refuse a device this machine does not have (it would fail deep inside the load)."""
    from residlab.models import resolve_device

    where = resolve_device(device)  # an unknown name is a UsageError already
    if where.type == "cpu":
        return
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (where.index or 0) < count:
            return
        have = f"cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
        raise UsageError(f"device {device!r} is not available on this server ({have}); use "
                         "auto, cpu or a device it has")
    if where.type == "mps" and torch.backends.mps.is_available():
        return
    raise UsageError(f"device {device!r} is not available on this server; use auto, cpu, "
                     "cuda, cuda:N or mps where present")


def _load(state: ServerState, request: LoadRequest) -> None:
    """Load what ``request`` names and make it the served model (the old one stays until the
    new one loaded)."""
    from residlab.models import load_model

    if request.model is not None and request.variant is not None:
        raise UsageError("give 'variant' or 'model', not both")
    if request.model is None:
        if state.experiment is None:
            raise UsageError("this server serves no experiment; give 'model' (a hub id, local "
                             "folder or 'default') or restart with --experiment")
        from residlab.experiments import load_variant

        variant, spec = state.experiment.variant(request.variant)
        _check_device(spec.device)
        loaded = load_variant(state.experiment, variant)
    else:
        variant = None
        _check_device(request.device)
        loaded = load_model(request.model, dtype=request.dtype, device=request.device)
    with state.model_lock:
        state.loaded, state.variant = loaded, variant
        state.generation += 1  # caches made for the old model no longer match
        state.cache.clear()  # norm scales, arch, ... belonged to the old model


def _prompt_ids(tokenizer, prompt: str, request: GenerateRequest) -> list[int]:
    from residlab.prompts import template_ids

    if not request.chat_template:
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        system = [{"role": "system", "content": request.system_prompt}] \
            if request.system_prompt else []
        ids = template_ids(tokenizer, [*system, {"role": "user", "content": prompt}])[1]
    if not ids:
        raise UsageError("a prompt tokenises to nothing; give some text")
    return ids


def _rows(loaded, request: GenerateRequest) -> list[list[int]]:
    return [_prompt_ids(loaded.tokenizer, prompt, request) for prompt in request.prompts()]


def _generate(loaded, request: GenerateRequest, interventions: list[Intervention],
              rows: list[list[int]] | None = None) -> list[dict[str, Any]]:
    """Template (unless ``rows`` are given), generate as one batch, decode: one result per
    prompt."""
    tokenizer = loaded.tokenizer
    prompts = request.prompts()
    rows = _rows(loaded, request) if rows is None else rows
    outputs = generate_ids(loaded.model, tokenizer, rows, interventions=interventions,
                           **request.gen())
    special = set(tokenizer.all_special_ids)
    return [{"prompt": prompt, "response": tokenizer.decode(
                [t for t in out.token_ids if t not in special]),
             "token_ids": row + out.token_ids, "prompt_end": len(row),
             "finish_reason": out.finish_reason}
            for prompt, row, out in zip(prompts, rows, outputs, strict=True)]


def _generate_plain(loaded, request: GenerateRequest) -> dict[str, Any]:
    return {"results": _generate(loaded, request, [])}


def _check_ids(loaded, prompts: list[list[int]]) -> None:
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    for row in prompts:
        if not row:
            raise UsageError("an empty prompt: every row needs at least one token id")
        if min(row) < 0 or max(row) >= vocab:
            raise UsageError(f"token ids must be in 0..{vocab - 1} for this model")


def _generate_ids(loaded, request: IdsRequest) -> dict[str, Any]:
    _check_ids(loaded, request.prompts)
    settings = request.model_dump(exclude={"prompts"})
    outputs = generate_ids(loaded.model, loaded.tokenizer, request.prompts, **settings)
    return {"outputs": [{"token_ids": out.token_ids, "finish_reason": out.finish_reason}
                        for out in outputs]}


def _settings(loaded, request: IdsSettings) -> dict[str, Any]:
    return {"generation_settings": effective_generation_settings(
        loaded.model, loaded.tokenizer, **request.model_dump())}


def _steering(state: ServerState, loaded, request: SteeringRequest):
    """The Adds of the request and what they are (trait vectors via ``resolve_steering``)."""
    from residlab.arch import resolve_arch

    arch = resolve_arch(loaded.model)
    interventions: list[Intervention] = []
    records: list[dict[str, Any]] = []
    if request.steering:
        if state.experiment is None:
            raise UsageError("trait steering reads the served experiment's vectors; restart "
                             "with --experiment, or send raw 'vectors'")
        from residlab.traits.steer import resolve_steering

        specs = [(s.trait, s.layer, s.coefficient) for s in request.steering]
        for steering in resolve_steering(state.experiment, loaded, specs):
            interventions.append(steering.intervention)
            records.append(steering.record())
    for raw in request.vectors:
        interventions.append(_raw_add(raw, arch))
        records.append({"vector": "raw", "layer": arch.normalize_layer(raw.layer),
                        "coefficient": raw.coefficient})
    return interventions, records


def _raw_add(raw: RawVector, arch) -> Add:
    vector = torch.tensor(raw.vector, dtype=torch.float32)  # (D,)
    if vector.shape[0] != arch.d_model:
        raise UsageError(f"a vector of size {vector.shape[0]}; the model's hidden size is "
                         f"{arch.d_model}")
    norm = vector.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise UsageError("a raw steering vector must be finite and non-zero")
    return Add(arch.normalize_layer(raw.layer), vector / norm * raw.coefficient, site="resid_post")


def _generate_steered(loaded, state: ServerState, request: SteeringRequest) -> dict[str, Any]:
    interventions, records = _steering(state, loaded, request)
    return {"results": _generate(loaded, request, interventions), "steering": records}


def capture_answer_bytes(rows: list[list[int]], max_new_tokens: int, n_layers: int,
                         n_components: int, d_model: int, itemsize: int) -> int:
    """An upper bound on the base64 activations of a ``/generate/with-capture`` answer: every
    prompt and all its new tokens, each selected layer and component, safetensors headers."""
    tensors = len(rows) * 2 * n_layers * n_components  # a prompt and a response part each
    tokens = sum(len(row) + max_new_tokens for row in rows)
    raw = tokens * n_layers * n_components * d_model * itemsize
    return (raw + tensors * SAFETENSORS_ENTRY_BYTES + 2) // 3 * 4  # base64: 4 per 3 bytes


def _check_capture_size(request: CaptureGenerateRequest, rows: list[list[int]],
                        layers: list[int], d_model: int, itemsize: int) -> None:
    size = capture_answer_bytes(rows, request.max_new_tokens, len(layers),
                                len(request.components), d_model, itemsize)
    if size > MAX_CAPTURE_ANSWER_BYTES:
        raise HTTPException(413, f"the activations would take up to {size / 2**20:.0f} MiB "
                                 f"(limit {MAX_CAPTURE_ANSWER_BYTES // 2**20} MiB); capture "
                                 "fewer layers or components, fewer prompts or max_new_tokens, "
                                 "or POST /capture to write files instead")


def _generate_captured(loaded, request: CaptureGenerateRequest) -> dict[str, Any]:
    """Generate, then one prefill capture over prompt + response (as ``residlab capture``);
    each result's ``activations`` is a base64 safetensors file named like a raw capture.
    An answer estimated over the limit is refused before anything runs."""
    from safetensors.torch import save

    from residlab.arch import resolve_arch
    from residlab.inference.capture import STORAGE_DTYPES, capture_records, parse_layers

    arch = resolve_arch(loaded.model)
    layers = parse_layers(request.layers, arch.n_layers)
    rows = _rows(loaded, request)
    _check_capture_size(request, rows, layers, arch.d_model,
                        STORAGE_DTYPES[request.dtype].itemsize)
    results = _generate(loaded, request, [], rows)
    captured = capture_records(loaded.model, arch, results, layers, request.components,
                               pad_id=loaded.tokenizer.pad_token_id or 0,
                               dtype=STORAGE_DTYPES[request.dtype])
    for result, tensors in zip(results, captured, strict=True):
        data = save({name: tensor.contiguous() for name, tensor in tensors.items()})
        result["activations"] = base64.b64encode(data).decode("ascii")
    return {"results": results, "layers": layers, "components": request.components}


def model_router(state: ServerState, *, allow_model_load: bool = False) -> APIRouter:
    """``/health``, ``/model/...`` and ``/generate...`` bound to one server's state;
    ``allow_model_load`` lets ``/model/load`` take any hub id or server path."""
    router = APIRouter(tags=["model"])
    loading = threading.Lock()  # one load at a time: two models side by side may not fit

    @router.get("/health")
    async def get_health() -> dict[str, Any]:
        return health(state)

    @router.get("/model/info")
    async def model_info() -> dict[str, Any]:
        """The served model's provenance (what response files record as its identity)."""
        loaded = _loaded(state)
        return {"variant": state.variant, "name": loaded.name, "provenance": loaded.provenance}

    @router.post("/model/load")
    async def model_load(request: LoadRequest) -> dict[str, Any]:
        """Serve a variant of the experiment (or, with --allow-model-load, any model)."""
        if request.model is not None and not allow_model_load:
            raise HTTPException(403, "this server loads only the served experiment's variants "
                                     "({\"variant\": ...}); restart it with --allow-model-load "
                                     "to load a hub id or path")
        if not loading.acquire(blocking=False):
            raise HTTPException(409, "a model is loading already; wait for it (GET /health) "
                                     "and try again")
        try:
            await run_in_threadpool(_load, state, request)
        finally:
            loading.release()
        return health(state)

    @router.post("/generate")
    async def generate(request: GenerateRequest) -> dict[str, Any]:
        return await run_locked(state, _generate_plain, request)

    @router.post("/generate/with-steering")
    async def generate_with_steering(request: SteeringRequest) -> dict[str, Any]:
        return await run_locked(state, lambda loaded: _generate_steered(loaded, state, request))

    @router.post("/generate/with-capture")
    async def generate_with_capture(request: CaptureGenerateRequest) -> dict[str, Any]:
        return await run_locked(state, _generate_captured, request)

    @router.post("/generate/ids")
    async def generate_from_ids(request: IdsRequest) -> dict[str, Any]:
        """``generate_ids`` on the given prompt ids (the ``residlab responses`` path)."""
        return await run_locked(state, _generate_ids, request)

    @router.post("/generate/settings")
    async def generation_settings(request: IdsSettings) -> dict[str, Any]:
        """``effective_generation_settings`` for these ``generate_ids`` keywords."""
        return await run_locked(state, _settings, request)

    return router
