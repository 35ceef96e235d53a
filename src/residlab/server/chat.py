"""Live Chat routes: ``POST /api/chat`` (a server-sent event stream) and ``GET /api/traits``.

Every problem found before the stream starts is a JSON error ``{"error": "..."}`` with its
status: 400 body not JSON, 404 unknown trait, 409 no model loaded, 413 a conversation that
leaves no room in the model's context, 415 a body not sent as ``application/json`` (what a
cross-site form sends), 422 a body that is not an object, malformed messages or a field out of
range (``max_tokens`` <= 0 or above :data:`MAX_TOKENS`, or more than the context has left),
429 :data:`MAX_STREAMS` streams running already. Once the stream has started, a failure is a
last event ``{"error": "...", "done": true}``.

Stream events, one ``data: {json}`` each: ``{"status": "loading", "vector_metadata": {...}}``;
one per prompt token from ``previous_context_length`` on and one per generated token
(:meth:`residlab.server.live.LiveGeneration.step`); then ``{"done": true, "full_response",
"finish_reason", "cached_tokens"}``. A client that disconnects stops the generation within one
token.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import anyio
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from sse_starlette import EventSourceResponse

from residlab.arch import resolve_arch
from residlab.errors import NotFound, UsageError
from residlab.generation import context_length
from residlab.prompts import template_ids
from residlab.server.live import ConversationCache, LiveGeneration, LiveSetup, Steer, Trait
from residlab.server.security import is_json
from residlab.server.state import ServerState
from residlab.server.steering_scale import norm_scales

__all__ = ["MAX_STREAMS", "MAX_TOKENS", "ChatRequest", "chat_router", "available_traits"]

log = logging.getLogger(__name__)

MAX_TOKENS = 8192  # per request; more is surely a mistake
MAX_STREAMS = 32  # streams at once: each holds a key-value cache and a share of the model
MAX_COEFFICIENT = 100.0  # in typical norms: far beyond anything coherent
CONVERSATIONS = "chat_conversations"  # state.cache key of the ConversationCache


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class SteerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trait: str
    coefficient: float = Field(allow_inf_nan=False, ge=-MAX_COEFFICIENT, le=MAX_COEFFICIENT)


class ChatRequest(BaseModel):
    """The body of ``POST /api/chat``."""

    model_config = ConfigDict(extra="forbid")

    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: StrictInt = Field(256, gt=0, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=10.0, allow_inf_nan=False)
    traits: list[str] | None = None  # None: every trait with a vector
    steering: list[SteerRequest] = []
    previous_context_length: StrictInt = Field(0, ge=0)  # prompt tokens the page already has
    steer_prompt: bool = False  # also steer the prompt's tokens
    seed: StrictInt | None = None  # sampling seed (temperature > 0)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item.get("loc", ())) or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


def available_traits(state: ServerState) -> dict[str, Trait]:
    """Every trait with a vector in the served experiment, each at its best layer."""
    from residlab.inference.project import traits_with_vectors
    from residlab.traits.select import select_vectors

    if state.experiment is None:
        return {}
    experiment = state.experiment
    source, _ = experiment.variant(None, role="extraction")
    arch = resolve_arch(state.loaded.model)
    out = {}
    for name in traits_with_vectors(experiment, source):
        (choice,) = select_vectors(experiment, name, variant=source, layer="best",
                                   steer_variant=state.variant, n_layers=arch.n_layers)
        vector = choice.vector
        if vector.vector.shape[0] != arch.d_model:
            raise UsageError(f"the {name} vector has size {vector.vector.shape[0]} but the "
                             f"model's hidden size is {arch.d_model}; serve the model it was "
                             "extracted with")
        out[name] = Trait(name, vector.layer, vector.unit, {
            "layer": vector.layer, "method": vector.method, "position": vector.position,
            "source": f"{experiment.name}/{vector.variant} {vector.component}: {choice.reason}"})
    return out


def _pick(known: dict[str, Trait], names: list[str], what: str) -> list[Trait]:
    unknown = [name for name in names if name not in known]
    if unknown:
        listing = ", ".join(known) or "none (serve an experiment with extracted vectors)"
        raise NotFound(f"unknown trait(s) {', '.join(map(repr, unknown))} in {what}; traits "
                       f"with vectors: {listing}")
    return [known[name] for name in dict.fromkeys(names)]


def _setup(state: ServerState, request: ChatRequest) -> LiveSetup:
    known = available_traits(state)
    traits = _pick(known, list(known) if request.traits is None else request.traits, "traits")
    names = [s.trait for s in request.steering]
    if len(set(names)) != len(names):
        raise UsageError("steering names a trait twice; give one coefficient per trait")
    steered = _pick(known, names, "steering")
    scales = norm_scales(state) if any(s.coefficient for s in request.steering) else {}
    steering = tuple(Steer(t, s.coefficient, scales.get(t.layer, 0.0))
                     for t, s in zip(steered, request.steering, strict=True))
    return LiveSetup(tuple(traits), steering, request.steer_prompt)


def _prompt_ids(loaded, request: ChatRequest) -> list[int]:
    """Templated ids of the conversation; a conversation that does not fit is refused."""
    if request.messages[-1].role != "user":
        raise UsageError("the last message must be the user's (role 'user'): the model "
                         "answers it")
    messages = [m.model_dump() for m in request.messages]
    try:
        ids = template_ids(loaded.tokenizer, messages)[1]
    except UsageError:
        raise
    except Exception as error:  # the template's own checks (e.g. roles must alternate)
        raise UsageError(f"the model's chat template refused these messages: {error}") from None
    limit = context_length(loaded.model)
    if limit is not None and len(ids) >= limit:
        raise _TooLong(f"the conversation is {len(ids)} tokens and the model's context is "
                       f"{limit}; start a new conversation or remove earlier messages")
    if limit is not None and len(ids) + request.max_tokens > limit:
        raise UsageError(f"max_tokens={request.max_tokens} after a conversation of {len(ids)} "
                         f"tokens exceeds the model's context of {limit}; use max_tokens <= "
                         f"{limit - len(ids)}")
    return ids


class _TooLong(UsageError):
    """The conversation alone fills the context (413)."""


def _status(error: UsageError) -> int:
    if isinstance(error, NotFound):
        return 404
    return 413 if isinstance(error, _TooLong) else 422


def _conversations(state: ServerState) -> ConversationCache:
    store = state.cache.get(CONVERSATIONS)
    if store is None:
        store = state.cache[CONVERSATIONS] = ConversationCache()
    return store


def _prepare(state: ServerState, request: ChatRequest) -> LiveGeneration:
    """Everything checked and resolved before the first byte of the stream, for the model
    loaded now (a load meanwhile does not mix two models in one stream)."""
    loaded, generation = state.loaded, state.generation
    ids = _prompt_ids(loaded, request)
    return LiveGeneration(loaded, _setup(state, request), ids, request.max_tokens,
                          state.model_lock, temperature=request.temperature, seed=request.seed,
                          store=_conversations(state),
                          first_event=min(request.previous_context_length, len(ids)),
                          generation=generation)


def _event(payload: dict[str, Any]) -> str:
    return orjson.dumps(payload).decode()


async def _stream(state: ServerState, request: Request, live: LiveGeneration):
    """The events of one generation; every path out frees the stream's cache.

    The first item is ``None``, taken by :func:`_chat` before the response exists: from then
    on the stream is counted, and closing it (or collecting it unread) runs ``finally``."""
    state.active_streams += 1
    try:
        yield None
        metadata = {t.name: t.metadata for t in live.setup.traits}
        yield _event({"status": "loading", "vector_metadata": metadata})
        for event in await anyio.to_thread.run_sync(live.prefill):
            yield _event(event)
        while not live.finished:
            if await request.is_disconnected():
                return
            yield _event(await anyio.to_thread.run_sync(live.step))
        reason = "stop" if live.generated[-1] in live.stops else "length"
        yield _event({"done": True, "full_response": live.full_response(),
                      "finish_reason": reason, "cached_tokens": live.reused})
    except Exception as error:  # after the stream started: a last event, never a hang
        log.exception("chat stream failed")
        message = " ".join(str(error).split()) if isinstance(error, UsageError) else (
            f"generation failed ({type(error).__name__}: {' '.join(str(error).split())[:200]})")
        yield _event({"error": message, "done": True})
    finally:
        live.close()
        state.active_streams -= 1


def _busy() -> JSONResponse:
    return _error(429, f"{MAX_STREAMS} chat streams are running; wait for one to finish and "
                       "try again")


async def _parse(request: Request) -> ChatRequest | JSONResponse:
    """The request's body as a ChatRequest, or the JSON error saying what is wrong with it."""
    if not is_json(request.headers.get("content-type")):
        return _error(415, "send the body as JSON with 'Content-Type: application/json'")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return _error(400, "the request body is not valid JSON")
    if not isinstance(body, dict):
        return _error(422, "the request body must be a JSON object ({\"messages\": [...]})")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as error:
        return _error(422, _validation_message(error))


async def _chat(state: ServerState, request: Request) -> Response:
    parsed = await _parse(request)
    if isinstance(parsed, JSONResponse):
        return parsed
    if state.loaded is None:
        return _error(409, "no model is loaded; load one with POST /model/load")
    if state.active_streams >= MAX_STREAMS:
        return _busy()  # before any work
    try:
        live = await anyio.to_thread.run_sync(_prepare, state, parsed)
    except UsageError as error:
        return _error(_status(error), str(error))
    if state.active_streams >= MAX_STREAMS:  # others started while this one prepared
        live.close()
        return _busy()
    events = _stream(state, request, live)
    await anext(events)  # counted now: nothing ran on the event loop since the check
    return EventSourceResponse(events, sep="\n")


def _trait_rows(state: ServerState) -> list[dict[str, Any]]:
    traits = available_traits(state)
    scales = norm_scales(state) if traits else {}
    return [{"trait": t.name, "layer": t.layer, "method": t.metadata["method"],
             "position": t.metadata["position"], "norm_scale": scales[t.layer]}
            for t in traits.values()]


def chat_router(state: ServerState) -> APIRouter:
    """The chat routes bound to one server's state."""
    router = APIRouter(tags=["chat"])

    @router.post("/api/chat", response_model=None)
    async def chat(request: Request) -> Response:
        """Stream a reply to ``messages`` with per-token trait readouts (text/event-stream)."""
        return await _chat(state, request)

    @router.get("/api/traits")
    async def traits() -> Response:
        """The traits with vectors: layer, method, position and the layer's norm scale."""
        if state.loaded is None:
            return _error(409, "no model is loaded; load one with POST /model/load")
        try:
            rows = await anyio.to_thread.run_sync(_trait_rows, state)
        except UsageError as error:
            return _error(_status(error), str(error))
        return JSONResponse({"traits": rows})

    return router
