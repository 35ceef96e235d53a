"""The model-server routes: health, model loading, and generation (plain, steered, captured).

Every route that touches the model runs in a worker thread under ``state.model_lock``
(:func:`run_locked`), so the event loop keeps answering ``/health`` and streams while a
generation runs, and requests take the model one at a time. ``POST /generate/ids`` is the
exact ``generate_ids`` call of ``residlab responses`` Mode A (token ids in, new ids out), and
``POST /generate/settings`` the matching ``effective_generation_settings``, so responses made
through the server are the files a local run writes.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from residlab.errors import UsageError
from residlab.generation import GenerationDefaults, effective_generation_settings, generate_ids
from residlab.hooks import Add, Intervention
from residlab.options import DType, StorageDType
from residlab.server.state import ServerState
from residlab.server.tasks import active_tasks

__all__ = ["MAX_NEW_TOKENS", "MAX_PROMPTS", "health", "model_router", "run_locked"]

T = TypeVar("T")
MAX_PROMPTS = 64  # prompts per request
MAX_NEW_TOKENS = 8192
Component = Literal["residual", "attn_contribution", "mlp_contribution"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoadRequest(_Strict):
    variant: str | None = Field(None, description="a variant of the served experiment")
    model: str | None = Field(None, description="hub id, local folder or 'default' (no "
                              "experiment needed)")
    dtype: DType = Field("bf16", description="with 'model' only (a variant has its own)")
    device: str = Field("auto", description="with 'model' only")


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


class GenerateRequest(GenerationSettings):
    prompt: str | list[str] = Field(..., description="one prompt or a batch")
    system_prompt: str | None = None
    chat_template: bool = Field(True, description="false: the text is tokenised as it is")

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

        variant, _ = state.experiment.variant(request.variant)
        loaded = load_variant(state.experiment, variant)
    else:
        variant = None
        loaded = load_model(request.model, dtype=request.dtype, device=request.device)
    with state.model_lock:
        state.loaded, state.variant = loaded, variant
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


def _generate(loaded, request: GenerateRequest,
              interventions: list[Intervention]) -> list[dict[str, Any]]:
    """Template, generate as one batch, decode: one result per prompt."""
    tokenizer = loaded.tokenizer
    prompts = request.prompts()
    rows = [_prompt_ids(tokenizer, prompt, request) for prompt in prompts]
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


def _generate_captured(loaded, request: CaptureGenerateRequest) -> dict[str, Any]:
    """Generate, then one prefill capture over prompt + response (as ``residlab capture``);
    each result's ``activations`` is a base64 safetensors file named like a raw capture."""
    from safetensors.torch import save

    from residlab.arch import resolve_arch
    from residlab.inference.capture import STORAGE_DTYPES, capture_records, parse_layers

    results = _generate(loaded, request, [])
    arch = resolve_arch(loaded.model)
    layers = parse_layers(request.layers, arch.n_layers)
    captured = capture_records(loaded.model, arch, results, layers, request.components,
                               pad_id=loaded.tokenizer.pad_token_id or 0,
                               dtype=STORAGE_DTYPES[request.dtype])
    for result, tensors in zip(results, captured, strict=True):
        data = save({name: tensor.contiguous() for name, tensor in tensors.items()})
        result["activations"] = base64.b64encode(data).decode("ascii")
    return {"results": results, "layers": layers, "components": request.components}


def model_router(state: ServerState) -> APIRouter:
    """``/health``, ``/model/...`` and ``/generate...`` bound to one server's state."""
    router = APIRouter(tags=["model"])

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
        await run_in_threadpool(_load, state, request)
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
