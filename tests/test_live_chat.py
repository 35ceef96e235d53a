"""Live Chat stream against plain greedy generation, offline capture + projection, and a
plain forward for steering; concurrency, disconnects, key-value cache reuse and bad input."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import socket
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from residlab.arch import resolve_arch
from residlab.errors import UsageError
from residlab.experiments import load_experiment
from residlab.generation import generate_ids
from residlab.hooks import Capture, Readout, intervene
from residlab.inference.calibrate import calibration_path
from residlab.inference.capture import capture_records
from residlab.inference.project import project_many
from residlab.inference.prompt_sets import load_prompt_set
from residlab.prompts import template_ids
from residlab.server import live as live_module
from residlab.server import model_api, steering_scale
from residlab.server.chat import MAX_STREAMS, chat_router
from residlab.server.live import ConversationCache, LiveGeneration, LiveSetup, common_prefix
from residlab.server.state import ServerState
from residlab.store import write_json
from residlab.traits.vectors import TraitVector, save_vector

TRAITS = {"demo/alpha": 1, "demo/beta": 2}  # trait -> layer (tiny llama has 4)
HELLO = [{"role": "user", "content": "Explain how tides work and why."}]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("experiments")
    (root / "e").mkdir()
    (root / "e" / "config.yaml").write_text(
        f"model_variants:\n  tiny:\n    model: {tiny_llama_dir}\n    dtype: fp32\n")
    exp = load_experiment("e", root)
    generator = torch.Generator().manual_seed(1)
    for trait, layer in TRAITS.items():
        vector = torch.randn(64, generator=generator) * 3  # not unit: the stream normalises
        save_vector(exp, TraitVector(trait, "tiny", "response[:5]", "residual", "mean_diff",
                                     layer, vector, {"effect_size": 1.0}))
    return exp


@pytest.fixture
def state(tiny_llama, experiment):
    return ServerState(loaded=tiny_llama, experiment=experiment, variant="tiny")


def _app(state: ServerState) -> FastAPI:
    app = FastAPI()
    app.include_router(chat_router(state))
    return app


def _events(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines()
            if line.startswith("data: ")]


def _chat(state, **body) -> list[dict]:
    response = TestClient(_app(state)).post("/api/chat", json={"messages": HELLO, **body})
    assert response.status_code == 200, response.text
    return _events(response.text)


def _generated(events: list[dict]) -> list[int]:
    return [e["token_id"] for e in events if "token_id" in e and not e["is_prompt"]]


def _units(experiment) -> dict[str, torch.Tensor]:
    from residlab.traits.vectors import find_vectors, load_vector

    return {t: load_vector(find_vectors(experiment, t, "tiny", position=None,
                                        component="residual", method=None)[0].path).unit
            for t in TRAITS}


def test_zero_steering_equals_plain_greedy(state, tiny_llama):
    for steering in ([], [{"trait": "demo/alpha", "coefficient": 0.0}]):
        events = _chat(state, max_tokens=12, steering=steering)
        ids = template_ids(tiny_llama.tokenizer, HELLO)[1]
        (plain,) = generate_ids(tiny_llama.model, tiny_llama.tokenizer, [ids], max_new_tokens=12)
        with torch.no_grad():
            hf = tiny_llama.model.generate(torch.tensor([ids]), max_new_tokens=12,
                                           do_sample=False)[0, len(ids):].tolist()
        assert _generated(events) == plain.token_ids == hf[:len(plain.token_ids)]
        assert [e["token_id"] for e in events if e.get("is_prompt")] == ids
        assert events[0]["status"] == "loading" and set(events[0]["vector_metadata"]) == {*TRAITS}
        assert events[-1]["done"] and events[-1]["full_response"] == tiny_llama.tokenizer.decode(
            plain.token_ids, skip_special_tokens=True)


def test_projections_equal_offline_capture_and_project(state, tiny_llama, experiment):
    events = [e for e in _chat(state, max_tokens=10) if "token_id" in e]
    ids = [e["token_id"] for e in events]
    prompt_end = sum(e["is_prompt"] for e in events)
    assert [e["token_index"] for e in events] == list(range(len(ids)))
    arch = resolve_arch(tiny_llama.model)
    (captured,) = capture_records(tiny_llama.model, arch, [{"token_ids": ids,
                                                            "prompt_end": prompt_end}],
                                  list(TRAITS.values()), ["residual"], pad_id=0,
                                  dtype=torch.float32)
    with torch.no_grad():  # and an independent plain forward
        hidden = tiny_llama.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for trait, unit in _units(experiment).items():
        layer = TRAITS[trait]
        offline = torch.cat([captured[f"prompt.layer{layer}.residual"],
                             captured[f"response.layer{layer}.residual"]])  # (N, D)
        assert torch.allclose(offline, hidden[layer + 1][0], atol=1e-5)
        (expected,) = project_many(offline, unit[None, :], [0.0])
        streamed = np.array([e["trait_projections"][trait] for e in events])
        cosines = np.array([e["trait_scores"][trait] for e in events])
        np.testing.assert_allclose(streamed, expected["projections"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(cosines, expected["cosine"], atol=1e-4, rtol=0)


def test_readout_equals_capture_and_checks_units(tiny_llama):
    model = tiny_llama.model
    units = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)  # (K, D)
    ids = torch.tensor([template_ids(tiny_llama.tokenizer, HELLO)[1]])
    readout, capture = Readout(2, units), Capture(2, "resid_post")
    with torch.no_grad(), intervene(model, [readout, capture]):
        model(ids)
    h = capture.values()[0]  # (T, D)
    torch.testing.assert_close(readout.projections[0][0], h @ units.T)
    torch.testing.assert_close(readout.cosines[0][0], (h @ units.T) / h.norm(dim=-1)[:, None])
    with pytest.raises(UsageError, match="Readout units"), intervene(
            model, [Readout(2, torch.ones(64))]):
        pass


def _median_prompt_norms(loaded) -> dict[int, float]:
    """Oracle: numpy median of every calibration prompt token's resid_post norm, one prompt
    at a time through output_hidden_states (no padding, no hooks)."""
    norms: dict[int, list] = {}
    for item in load_prompt_set("calibration"):
        ids = torch.tensor([template_ids(loaded.tokenizer, item.messages())[1]])
        with torch.no_grad():
            hidden = loaded.model(ids, output_hidden_states=True).hidden_states
        for layer in range(len(hidden) - 2):  # the last entry is after the final norm
            norms.setdefault(layer, []).extend(hidden[layer + 1][0].norm(dim=-1).tolist())
    return {layer: float(np.median(values)) for layer, values in norms.items()}


def _block_inputs(model, layer: int) -> tuple[list[torch.Tensor], object]:
    """Record block ``layer``'s input (resid_post of layer - 1, after any Add) per forward."""
    seen: list[torch.Tensor] = []
    block = resolve_arch(model).blocks[layer]
    handle = block.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"])
                                              .detach().clone()), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("steer_prompt", [False, True])
def test_steering_adds_coefficient_times_unit_times_norm_scale(state, tiny_llama, experiment,
                                                               steer_prompt):
    scale = TestClient(_app(state)).get("/api/traits").json()["traits"][0]["norm_scale"]
    assert scale == pytest.approx(_median_prompt_norms(tiny_llama)[1], rel=1e-5)
    seen, handle = _block_inputs(tiny_llama.model, 2)
    try:
        events = _chat(state, max_tokens=6, steer_prompt=steer_prompt,
                       steering=[{"trait": "demo/alpha", "coefficient": 2.5}])
    finally:
        handle.remove()
    ids = [e["token_id"] for e in events if "token_id" in e]
    prompt_len = sum(e.get("is_prompt", False) for e in events)
    steered = torch.cat(seen, dim=1)[0]  # (N, D): every token fed exactly once
    with torch.no_grad():
        plain = tiny_llama.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[2]
    delta = steered - plain[0]  # (N, D)
    vector = 2.5 * scale * _units(experiment)["demo/alpha"]
    first = 0 if steer_prompt else prompt_len - 1  # the last prompt token chooses token one
    torch.testing.assert_close(delta[first:], vector.expand(len(ids) - first, -1),
                               atol=1e-5, rtol=0)
    assert first == 0 or delta[:first].abs().max() < 1e-5  # not steered before


def test_calibration_norm_is_used_when_present(state, experiment):
    path = calibration_path(experiment, "tiny")
    write_json(path, {"layers": {str(layer): {"mean_norm": 10.0 + layer, "dims": []}
                                 for layer in range(4)}})
    try:
        rows = TestClient(_app(state)).get("/api/traits").json()["traits"]
    finally:
        path.unlink()
    assert {r["trait"]: r["norm_scale"] for r in rows} == {"demo/alpha": 11.0, "demo/beta": 12.0}


def _second_turn(state, first: list[dict], steering, edit: bool = False) -> list[dict]:
    answer = first[-1]["full_response"]
    user = HELLO if not edit else [{"role": "user", "content": "Something else entirely."}]
    messages = [*user, {"role": "assistant", "content": answer},
                {"role": "user", "content": "And the moon?"}]
    response = TestClient(_app(state)).post("/api/chat", json={
        "messages": messages, "max_tokens": 8, "steering": steering})
    return _events(response.text)


@pytest.mark.parametrize("coefficient", [0.0, 3.0])
def test_cache_reuse_gives_the_same_tokens_as_no_reuse(state, tiny_llama, experiment,
                                                       coefficient):
    steering = [{"trait": "demo/beta", "coefficient": coefficient}]
    first = _chat(state, max_tokens=8, steering=steering)
    reused = _second_turn(state, first, steering)
    fresh = _second_turn(ServerState(loaded=tiny_llama, experiment=experiment, variant="tiny"),
                         first, steering)
    first_ids = [e["token_id"] for e in first if "token_id" in e]
    prompt_len = sum(e.get("is_prompt", False) for e in first)
    shared = common_prefix(_prompt_ids(reused), first_ids)
    # Steering only the generated part: the first turn's answer was steered, a fresh prefill
    # of the second turn does not steer it, so reuse stops before it.
    assert reused[-1]["cached_tokens"] == (shared if coefficient == 0 else prompt_len - 1)
    assert fresh[-1]["cached_tokens"] == 0 and shared > prompt_len
    assert [e["token_id"] for e in reused if "token_id" in e] == \
        [e["token_id"] for e in fresh if "token_id" in e]
    for a, b in zip(reused[1:-1], fresh[1:-1], strict=True):
        for trait in TRAITS:
            assert a["trait_projections"][trait] == pytest.approx(
                b["trait_projections"][trait], abs=1e-4)
    edited = _second_turn(state, first, steering, edit=True)  # an edited first message
    assert edited[-1]["cached_tokens"] == common_prefix(_prompt_ids(edited), first_ids) < 8


def _prompt_ids(events: list[dict]) -> list[int]:
    return [e["token_id"] for e in events if e.get("is_prompt")]


def test_previous_context_length_skips_prompt_events(state):
    events = _chat(state, max_tokens=2, previous_context_length=5)
    prompt = [e for e in events if e.get("is_prompt")]
    assert prompt[0]["token_index"] == 5


def test_sampling_with_a_seed_repeats(state):
    runs = [_generated(_chat(state, max_tokens=10, temperature=1.0, seed=seed))
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and len(runs[0]) == 10


def test_twenty_concurrent_streams_complete(state, tiny_llama):
    texts = ["Explain how tides work.", "Write a poem about autumn."]
    expected = {}
    for text in texts:
        for coefficient in (0.0, 4.0):
            events = _chat(state, messages=[{"role": "user", "content": text}], max_tokens=10,
                           steering=[{"trait": "demo/alpha", "coefficient": coefficient}])
            expected[text, coefficient] = _generated(events)
    jobs = [(texts[i % 2], 4.0 * (i // 2 % 2)) for i in range(20)]

    async def run_all():
        transport = httpx.ASGITransport(app=_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(*(client.post("/api/chat", json={
                "messages": [{"role": "user", "content": text}], "max_tokens": 10,
                "steering": [{"trait": "demo/alpha", "coefficient": coefficient}]},
                timeout=60) for text, coefficient in jobs))

    responses = asyncio.run(run_all())
    for (text, coefficient), response in zip(jobs, responses, strict=True):
        events = _events(response.text)
        assert events[-1].get("done") and "error" not in events[-1]
        assert _generated(events) == expected[text, coefficient]  # no hook leaked across streams
    assert state.active_streams == 0 and not state.model_lock.locked()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _running_generation() -> list[str]:
    """Threads currently inside the engine's forward (stack frames of live.py)."""
    return [name for name, frame in ((t.name, sys._current_frames().get(t.ident))
                                     for t in threading.enumerate())
            if frame is not None and _in_live(frame)]


def _in_live(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename == live_module.__file__:
            return True
        frame = frame.f_back
    return False


def _disconnect_midway(url: str, n: int) -> None:
    def one() -> None:
        with httpx.Client(timeout=30) as client, client.stream("POST", url, json={
                "messages": HELLO, "max_tokens": 400, "traits": []}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and '"is_prompt":false' in line:
                    break  # leave after the first generated token

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_disconnecting_clients_leave_no_generation(state, tiny_llama):
    import uvicorn

    forwards: list[int] = []

    def slow_forward(*args) -> None:  # 400 tokens take ~2 s: clients leave long before
        forwards.append(1)
        time.sleep(0.005)

    slow = tiny_llama.model.register_forward_hook(slow_forward)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(_app(state), host="127.0.0.1", port=port,
                                           log_level="warning"))
    runner = threading.Thread(target=server.run, daemon=True)
    runner.start()
    try:
        while not server.started:
            time.sleep(0.01)
        gc.collect()
        counts, before = [], _engine_objects()
        for _ in range(2):
            _disconnect_midway(f"http://127.0.0.1:{port}/api/chat", 10)
            deadline = time.monotonic() + 5
            while (state.active_streams or _running_generation()) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert state.active_streams == 0 and _running_generation() == []
            gc.collect()
            counts.append((_threads_beyond_the_pool(), _engine_objects()))
            settled = len(forwards)
            time.sleep(0.2)
            assert len(forwards) == settled  # nothing runs once the clients are gone
        assert len(forwards) < 2 * 10 * 20  # each stopped within a few tokens, not 400
        assert counts[1][0] <= counts[0][0] and counts[1][1] == counts[0][1] == before
        assert not state.model_lock.locked()
    finally:
        slow.remove()
        server.should_exit = True
        runner.join(timeout=10)


def _threads_beyond_the_pool() -> int:
    """Live threads other than the worker pool's (which grows up to its bound on demand and
    keeps idle workers: not a leak)."""
    return sum(not t.name.startswith("AnyIO worker thread") for t in threading.enumerate())


def _engine_objects() -> tuple[int, int]:
    """Live generations and key-value caches still alive outside the conversation LRU."""
    from transformers import DynamicCache

    objects = gc.get_objects()
    generations = sum(type(o) is live_module.LiveGeneration for o in objects)
    caches = sum(type(o) is DynamicCache for o in objects)
    return generations, caches


def test_error_after_start_is_a_last_event(state, monkeypatch):
    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(live_module.LiveGeneration, "step", broken)
    events = _chat(state, max_tokens=4)
    assert events[-1] == {"error": "generation failed (RuntimeError: boom)", "done": True}
    assert state.active_streams == 0


def test_cached_norm_scales_do_not_wait_for_the_model(state, tiny_llama, experiment):
    client = TestClient(_app(state))
    first = client.get("/api/traits").json()  # measures the scales once
    other = ServerState(loaded=tiny_llama, experiment=experiment, variant="tiny")
    answers: list = []
    with other.model_lock, state.model_lock:  # long tasks hold both servers' models
        measuring = threading.Thread(target=steering_scale.norm_scales, args=(other,),
                                     daemon=True)
        measuring.start()  # waits for the other model
        time.sleep(0.2)
        asking = threading.Thread(target=lambda: answers.append(client.get("/api/traits")),
                                  daemon=True)
        asking.start()
        asking.join(timeout=5)
        assert answers and answers[0].json() == first  # cached: answered without the model
    measuring.join(timeout=30)
    assert not measuring.is_alive()


def test_norm_scales_follow_a_model_swap(tiny_llama, experiment, monkeypatch):
    from residlab import experiments

    swapped = copy.copy(tiny_llama)
    swapped.model = copy.deepcopy(tiny_llama.model)
    with torch.no_grad():
        swapped.model.model.embed_tokens.weight.mul_(3.0)  # other norms at every layer
    before = _median_prompt_norms(tiny_llama)
    expected = _median_prompt_norms(swapped)
    assert abs(expected[1] - before[1]) > 0.1 * before[1]
    state = ServerState(loaded=tiny_llama, experiment=experiment, variant="tiny")
    # The next model may get the old one's id(): make every id() equal.
    monkeypatch.setattr(steering_scale, "id", lambda obj: 1, raising=False)
    monkeypatch.setattr(experiments, "load_variant", lambda exp, variant: swapped)
    lookup = steering_scale._from_calibration

    def load_lands_meanwhile(st: ServerState):  # a /model/load while the scales are looked up
        if st.loaded is tiny_llama:
            model_api._load(st, model_api.LoadRequest(variant="tiny"))
        return lookup(st)

    monkeypatch.setattr(steering_scale, "_from_calibration", load_lands_meanwhile)
    steering_scale.norm_scales(state)
    assert state.loaded is swapped
    scales = steering_scale.norm_scales(state)
    assert scales[1] == pytest.approx(expected[1], rel=1e-5)  # not the old model's
    assert state.generation == 1


def _run_live(loaded, setup: LiveSetup, ids: list[int], store, generation: int) -> int:
    live = LiveGeneration(loaded, setup, ids, 3, threading.Lock(), store=store,
                          generation=generation)
    live.prefill()
    while not live.finished:
        live.step()
    return live.reused


def test_kept_conversations_belong_to_one_model_load(tiny_llama):
    ids = template_ids(tiny_llama.tokenizer, HELLO)[1]
    store, setup = ConversationCache(), LiveSetup((), ())
    assert _run_live(tiny_llama, setup, ids, store, 0) == 0
    assert _run_live(tiny_llama, setup, ids, store, 0) == len(ids) - 1  # same load: reused
    assert _run_live(tiny_llama, setup, ids, store, 1) == 0  # a new load: not


def test_concurrent_streams_are_capped(state):
    client = TestClient(_app(state))
    state.active_streams = MAX_STREAMS  # as if that many were running
    try:
        answer = client.post("/api/chat", json={"messages": HELLO, "max_tokens": 2})
        assert answer.status_code == 429 and "streams" in answer.json()["error"]
        assert state.active_streams == MAX_STREAMS
        state.active_streams = MAX_STREAMS - 1
        events = _events(client.post("/api/chat", json={"messages": HELLO,
                                                        "max_tokens": 2}).text)
        assert events[-1]["done"] and state.active_streams == MAX_STREAMS - 1
    finally:
        state.active_streams = 0


def test_chat_body_must_be_sent_as_json(state):
    form = b'{"messages": [{"role": "user", "content": "hi="}], "max_tokens": 2}'
    for headers in ({"content-type": "text/plain"}, {}):
        response = TestClient(_app(state)).post("/api/chat", content=form, headers=headers)
        assert response.status_code == 415, response.text
        assert "application/json" in response.json()["error"]
    assert state.active_streams == 0


LONG = [{"role": "user", "content": "tides " * 600}]


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"{not json", 400, "not valid JSON"),
    (b'"hello"', 422, "must be a JSON object"),
    (b"[1, 2]", 422, "must be a JSON object"),
    ({}, 422, "messages"),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "content"),
    ({"messages": [{"role": "user"}]}, 422, "content"),
    ({"messages": "hi"}, 422, "messages"),
    ({"messages": [*HELLO, {"role": "assistant", "content": "x"}]}, 422, "last message"),
    ({"messages": HELLO, "max_tokens": 0}, 422, "max_tokens"),
    ({"messages": HELLO, "max_tokens": -3}, 422, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 10**9}, 422, "max_tokens"),
    ({"messages": HELLO, "max_tokens": "5"}, 422, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 500}, 422, "max_tokens <= "),
    ({"messages": HELLO, "temperature": -1}, 422, "temperature"),
    ({"messages": HELLO, "traits": ["demo/nope"]}, 404, "demo/nope"),
    ({"messages": HELLO, "steering": [{"trait": "nope", "coefficient": 1}]}, 404, "nope"),
    ({"messages": HELLO, "steering": [{"trait": "demo/alpha", "coefficient": 1e9}]}, 422,
     "coefficient"),
    ({"messages": HELLO, "steering": [{"trait": "demo/alpha"}]}, 422, "coefficient"),
    ({"messages": HELLO, "surprise": 1}, 422, "surprise"),
    ({"messages": LONG}, 413, "context"),
])
def test_bad_input_is_a_json_error(state, body, status, words):
    client = TestClient(_app(state))
    if isinstance(body, bytes):
        response = client.post("/api/chat", content=body,
                               headers={"content-type": "application/json"})
    else:
        response = client.post("/api/chat", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"] and "\n" not in response.json()["error"]
    assert state.active_streams == 0


def test_no_model_and_bare_model(tiny_llama):
    empty = TestClient(_app(ServerState()))
    assert empty.post("/api/chat", json={"messages": HELLO}).status_code == 409
    bare = ServerState(loaded=tiny_llama)  # --model default: no experiment, no traits
    assert TestClient(_app(bare)).get("/api/traits").json() == {"traits": []}
    events = _chat(bare, max_tokens=3)
    assert events[0]["vector_metadata"] == {} and events[-1]["done"]
    assert TestClient(_app(bare)).post("/api/chat", json={
        "messages": HELLO, "traits": ["x"]}).status_code == 404
