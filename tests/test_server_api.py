"""The model server: routes against plain forwards and decodes, security, and bad input.

Routes run through FastAPI's test client and through a real uvicorn on a free loopback port
(:func:`serve_in_thread`); raw-socket requests check what an HTTP client would normalise away
(``..`` in paths, chunked bodies without a Content-Length).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from residlab.client import ResidlabClient, ServerError
from residlab.commands.serve import ServeOptions, run_serve
from residlab.errors import UsageError
from residlab.experiments import load_experiment
from residlab.inference.raw import load_raw
from residlab.inference.responses import generate_responses
from residlab.server import model_api
from residlab.server.app import STATIC_DIR, create_app
from residlab.server.security import check_bind, is_loopback, resolve_token
from residlab.server.state import ServerState
from residlab.traits.vectors import TraitVector, save_vector

TOKEN = "s3cret-token"
SECRET = "TOP-SECRET-OUTSIDE-STATIC"


# --- helpers ---------------------------------------------------------------------------------

@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """A real uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes as typed (no client normalisation); ``(status, body)``."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    header, _, payload = data.partition(b"\r\n\r\n")
    return int(header.split()[1]), payload


def greedy(model, ids: list[int], steps: int, stop: int, hook=None) -> list[int]:
    """Plain greedy decode: full forward each step, argmax, stop after the stop token."""
    out: list[int] = []
    handle = hook() if hook else None
    try:
        for _ in range(steps):
            with torch.no_grad():
                logits = model(torch.tensor([ids + out])).logits[0, -1]  # (V,)
            out.append(int(logits.argmax()))
            if out[-1] == stop:
                break
    finally:
        if handle is not None:
            handle.remove()
    return out


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture
def experiment(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    monkeypatch.delenv("RESIDLAB_TOKEN", raising=False)
    cpu = {"model": str(tiny_llama_dir), "dtype": "fp32", "device": "cpu"}
    (tmp_path / "experiments" / "exp").mkdir(parents=True)
    (tmp_path / "experiments" / "exp" / "config.yaml").write_text(yaml.safe_dump(
        {"model_variants": {"base": cpu}, "defaults": {"application": "base",
                                                      "extraction": "base"}}))
    return load_experiment("exp")


@pytest.fixture
def static_dir(tmp_path) -> Path:
    """A copy of the page's folder (or a stand-in) with symlinks pointing outside it."""
    folder = tmp_path / "static"
    if STATIC_DIR.is_dir():
        shutil.copytree(STATIC_DIR, folder, symlinks=True)
    (folder / "vendor").mkdir(parents=True, exist_ok=True)
    (folder / "chat.html").write_text("<!doctype html><title>chat</title>")
    (folder / "chat.js").write_text("console.log('chat');")
    (folder / "vendor" / "lib.js").write_text("export const lib = 1;")
    outside = tmp_path / "secret.txt"
    outside.write_text(SECRET)
    (folder / "link.txt").symlink_to(outside)
    (folder / "vendor" / "link.js").symlink_to(outside)
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.js").write_text(SECRET)
    return folder


@pytest.fixture
def state(tiny_llama, experiment) -> ServerState:
    return ServerState(loaded=tiny_llama, experiment=experiment, variant="base")


@pytest.fixture
def client(state, static_dir) -> TestClient:
    return TestClient(create_app(state, static_dir=static_dir), base_url="http://127.0.0.1:8765")


# --- model routes ----------------------------------------------------------------------------

def test_health_reports_the_served_model(client, tiny_llama):
    assert client.get("/health").json() == {
        "status": "ok", "model": tiny_llama.provenance["model"], "variant": "base",
        "loaded": True, "n_layers": 4, "hidden_dim": 64, "device": "cpu", "dtype": "float32",
        "active_tasks": 0, "active_streams": 0}
    assert client.get("/model/info").json()["provenance"]["config_sha256"] == (
        tiny_llama.provenance["config_sha256"])


def test_generate_equals_a_plain_greedy_decode(client, tiny_llama):
    from residlab.prompts import template_ids

    tokenizer = tiny_llama.tokenizer
    prompts = ["Explain how tides work.", "Bread?"]
    answer = client.post("/generate", json={"prompt": prompts, "max_new_tokens": 7}).json()
    for prompt, result in zip(prompts, answer["results"], strict=True):
        ids = template_ids(tokenizer, [{"role": "user", "content": prompt}])[1]
        assert result["token_ids"][:result["prompt_end"]] == ids
        expected = greedy(tiny_llama.model, ids, 7, tokenizer.eos_token_id)
        assert result["token_ids"][result["prompt_end"]:] == expected


def test_generate_ids_is_generate_ids(client, tiny_llama):
    from residlab.generation import generate_ids

    rows = [[5, 6, 7, 8, 9], [10, 11]]
    answer = client.post("/generate/ids", json={"prompts": rows, "max_new_tokens": 5}).json()
    local = generate_ids(tiny_llama.model, tiny_llama.tokenizer, rows, max_new_tokens=5)
    assert [o["token_ids"] for o in answer["outputs"]] == [g.token_ids for g in local]
    assert client.post("/generate/ids", json={"prompts": [[10 ** 6]],
                                              "max_new_tokens": 2}).status_code == 400


def _adding_hook(model, layer: int, delta: torch.Tensor):
    """An independent steering oracle: a forward hook adding ``delta`` to a block's output."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta

    return lambda: model.model.layers[layer].register_forward_hook(hook)


def test_steering_with_a_raw_vector_and_a_trait_vector(client, tiny_llama, experiment):
    from residlab.prompts import template_ids

    tokenizer, model = tiny_llama.tokenizer, tiny_llama.model
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    save_vector(experiment, TraitVector("test/cheer", "base", "response[:5]", "residual",
                                        "mean_diff", 2, vector, {"effect_size": 1.0}))
    ids = template_ids(tokenizer, [{"role": "user", "content": "Hi"}])[1]
    unit = vector / vector.norm()
    expected = greedy(model, ids, 6, tokenizer.eos_token_id, _adding_hook(model, 2, 30 * unit))
    assert expected != greedy(model, ids, 6, tokenizer.eos_token_id)  # the push is visible
    for body in ({"vectors": [{"layer": 2, "vector": vector.tolist(), "coefficient": 30}]},
                 {"steering": [{"trait": "test/cheer", "layer": 2, "coefficient": 30}]}):
        answer = client.post("/generate/with-steering",
                             json={"prompt": "Hi", "max_new_tokens": 6, **body}).json()
        result = answer["results"][0]
        assert result["token_ids"][result["prompt_end"]:] == expected
        assert answer["steering"][0]["layer"] == 2
    unknown = client.post("/generate/with-steering", json={
        "prompt": "Hi", "steering": [{"trait": "test/none", "coefficient": 1}]})
    assert unknown.status_code == 404 and "test/none" in unknown.json()["error"]
    wrong = client.post("/generate/with-steering", json={
        "prompt": "Hi", "vectors": [{"layer": 1, "vector": [1.0, 2.0]}]})
    assert wrong.status_code == 400 and "hidden size" in wrong.json()["error"]


def test_generate_with_capture_equals_hidden_states(client, tiny_llama):
    from safetensors.torch import load

    answer = client.post("/generate/with-capture", json={
        "prompt": ["Write a poem.", "Paris?"], "max_new_tokens": 4, "layers": "1,2"}).json()
    assert answer["layers"] == [1, 2]
    for result in answer["results"]:
        tensors = load(base64.b64decode(result["activations"]))
        with torch.no_grad():
            hidden = tiny_llama.model(torch.tensor([result["token_ids"]]),
                                      output_hidden_states=True).hidden_states
        end = result["prompt_end"]
        for layer in (1, 2):  # (the last hidden state is after the final norm)
            torch.testing.assert_close(tensors[f"prompt.layer{layer}.residual"],
                                       hidden[layer + 1][0, :end], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(tensors[f"response.layer{layer}.residual"],
                                       hidden[layer + 1][0, end:], atol=1e-5, rtol=1e-5)


def test_capture_answer_over_the_limit_is_413_before_generating(client, monkeypatch):
    from residlab.inference.capture import STORAGE_DTYPES

    monkeypatch.setattr(model_api, "MAX_CAPTURE_ANSWER_BYTES", 200_000)
    generated: list[int] = []
    real_generate = model_api.generate_ids

    def counting(*args, **kwargs):
        generated.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model_api, "generate_ids", counting)
    every = ["residual", "attn_contribution", "mlp_contribution"]
    big = client.post("/generate/with-capture", json={
        "prompt": ["Write a poem.", "Paris?"], "max_new_tokens": 100, "components": every})
    assert big.status_code == 413, big.text
    assert "fewer layers" in big.json()["error"] and "/capture" in big.json()["error"]
    assert generated == []  # refused before anything ran
    small = client.post("/generate/with-capture", json={
        "prompt": ["Write a poem.", "Paris?"], "max_new_tokens": 5, "layers": "1",
        "dtype": "bf16"})
    assert small.status_code == 200 and generated == [1]
    results = small.json()["results"]
    rows = [r["token_ids"][:r["prompt_end"]] for r in results]
    bound = model_api.capture_answer_bytes(rows, 5, 1, 1, 64,
                                           STORAGE_DTYPES["bf16"].itemsize)
    sent = sum(len(r["activations"]) for r in results)
    assert sent <= bound < 4 * sent  # an upper bound, and not a wild one


def test_new_tokens_per_request_are_capped(client):
    from pydantic import ValidationError

    answer = client.post("/generate", json={"prompt": ["Hi"] * model_api.MAX_PROMPTS,
                                            "max_new_tokens": model_api.MAX_NEW_TOKENS})
    assert answer.status_code == 422 and "new tokens per request" in answer.json()["error"]
    limit = model_api.MAX_BATCH_TOKENS
    with pytest.raises(ValidationError, match="new tokens per request"):
        model_api.IdsRequest(prompts=[[5]] * (limit // 4096 + 1), max_new_tokens=4096)
    model_api.IdsRequest(prompts=[[5]] * (limit // 4096), max_new_tokens=4096)  # at the cap


def test_model_load_replaces_the_model(state, static_dir, tiny_gpt2_dir):
    client = TestClient(create_app(state, static_dir=static_dir, allow_model_load=True),
                        base_url="http://127.0.0.1:8765")
    loaded = client.post("/model/load", json={"model": str(tiny_gpt2_dir), "dtype": "fp32",
                                              "device": "cpu"})
    assert loaded.status_code == 200
    assert loaded.json()["n_layers"] == 3 and loaded.json()["variant"] is None
    back = client.post("/model/load", json={"variant": "base"}).json()
    assert back["n_layers"] == 4 and back["variant"] == "base"
    assert client.post("/model/load", json={"variant": "nope"}).status_code == 404
    assert state.generation == 2  # one per load: what the caches key on


def test_model_load_by_path_needs_the_switch(client, state, tiny_gpt2_dir, tiny_llama):
    refused = client.post("/model/load", json={"model": str(tiny_gpt2_dir), "device": "cpu"})
    assert refused.status_code == 403 and "--allow-model-load" in refused.json()["error"]
    assert state.loaded is tiny_llama and state.generation == 0  # nothing loaded
    variant = client.post("/model/load", json={"variant": "base"})  # always allowed
    assert variant.status_code == 200 and variant.json()["variant"] == "base"


def test_an_unavailable_device_is_400(state, static_dir, tiny_gpt2_dir, tiny_llama):
    client = TestClient(create_app(state, static_dir=static_dir, allow_model_load=True),
                        base_url="http://127.0.0.1:8765", raise_server_exceptions=False)
    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (or none at all)
    for device in (absent, "meta"):
        answer = client.post("/model/load", json={"model": str(tiny_gpt2_dir), "device": device})
        assert answer.status_code == 400, (device, answer.text)
        assert device in answer.json()["error"]
    assert state.loaded is tiny_llama


def test_a_second_load_while_one_runs_is_409(state, static_dir, tiny_llama, monkeypatch):
    from residlab import experiments

    started, release, calls = threading.Event(), threading.Event(), []

    def slow_load(experiment, variant):
        calls.append(variant)
        started.set()
        if len(calls) == 1:
            release.wait(10)  # the first load takes a while
        return tiny_llama

    monkeypatch.setattr(experiments, "load_variant", slow_load)
    app = create_app(state, static_dir=static_dir)

    async def two_loads():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            first = asyncio.create_task(http.post("/model/load", json={"variant": "base"}))
            while not started.is_set():
                await asyncio.sleep(0.01)
            second = await http.post("/model/load", json={"variant": "base"})
            release.set()
            return await first, second

    first, second = asyncio.run(two_loads())
    assert first.status_code == 200 and second.status_code == 409, second.text
    assert "loading" in second.json()["error"] and calls == ["base"]
    again = TestClient(app, base_url="http://127.0.0.1").post("/model/load",
                                                               json={"variant": "base"})
    assert again.status_code == 200 and calls == ["base", "base"]  # the lock was released


def test_no_model_loaded_is_409(static_dir):
    client = TestClient(create_app(ServerState(), static_dir=static_dir),
                        base_url="http://127.0.0.1")
    answer = client.post("/generate", json={"prompt": "hi"})
    assert answer.status_code == 409 and "/model/load" in answer.json()["error"]


def _wait(client, task_id: str) -> dict:
    for _ in range(500):
        record = client.get(f"/tasks/{task_id}").json()
        if record["status"] in ("done", "error"):
            return record
        time.sleep(0.02)
    raise AssertionError("task did not finish")


def test_capture_and_extract_viz_tasks(client, tiny_llama, experiment):
    missing = client.post("/capture", json={"prompt_set": "baseline", "layers": "1"})
    assert missing.status_code == 202
    failed = _wait(client, missing.json()["id"])
    assert failed["status"] == "error" and "residlab responses" in failed["error"]
    generate_responses(experiment, "baseline", max_new_tokens=3, limit=2, loaded=tiny_llama)
    task = client.post("/capture", json={"prompt_set": "baseline", "layers": "1",
                                         "dtype": "fp32"}).json()
    record = _wait(client, task["id"])
    assert record["status"] == "done" and record["result"]["written"] == 2, record
    response = json.loads(experiment.responses_dir("base", "baseline").joinpath("1.json")
                          .read_text())
    raw = load_raw(experiment.raw_dir("base", "baseline") / "1.safetensors")
    with torch.no_grad():
        hidden = tiny_llama.model(torch.tensor([response["token_ids"]]),
                                  output_hidden_states=True).hidden_states
    captured = torch.cat([raw[part]["activations"][1]["residual"]
                          for part in ("prompt", "response")])
    torch.testing.assert_close(captured, hidden[2][0], atol=1e-5, rtol=1e-5)
    viz = client.post("/extract-viz", json={"prompt_set": "baseline", "logit_lens": True,
                                            "layers": "1"}).json()
    assert _wait(client, viz["id"])["result"]["written"] == 2
    assert client.get("/tasks/nope").status_code == 404
    bad = client.post("/capture", json={"prompt_set": "../../etc"})
    assert bad.status_code == 422


def test_tasks_run_on_one_worker_with_a_bounded_queue(client, state):
    from residlab.server.tasks import MAX_PENDING

    residlab_log = logging.getLogger("residlab")
    handlers = list(residlab_log.handlers)
    with state.model_lock:  # a long generation holds the model
        first = client.post("/capture", json={"prompt_set": "baseline", "layers": "1"})
        deadline = time.monotonic() + 5
        while state.task_runner.pending() and time.monotonic() < deadline:
            time.sleep(0.01)  # the worker took it and waits for the model
        answers = [client.post("/capture", json={"prompt_set": "baseline", "layers": "1"})
                   for _ in range(MAX_PENDING + 3)]
        workers = [t for t in threading.enumerate() if t.name.startswith("residlab-")]
        progress = [h for h in residlab_log.handlers if h not in handlers]
    assert first.status_code == 202
    assert [a.status_code for a in answers] == [202] * MAX_PENDING + [429] * 3
    assert "waiting" in answers[-1].json()["error"]
    assert len(workers) == 1 and len(progress) <= 1
    accepted = [first.json()["id"]] + [a.json()["id"] for a in answers[:MAX_PENDING]]
    assert len(state.tasks) == MAX_PENDING + 1  # refused tasks leave no record
    for task_id in accepted:  # they all run (and fail: no responses), one after another
        assert _wait(client, task_id)["status"] == "error"
    deadline = time.monotonic() + 5
    while any(t.name.startswith("residlab-") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the task worker did not exit"
        time.sleep(0.01)
    assert residlab_log.handlers == handlers


# --- bad input and errors --------------------------------------------------------------------

def test_bad_bodies_are_json_errors(client):
    cases = [
        (b"{not json", 400), (b'{"prompt": "hi", "max_new_tokens": 0}', 422),
        (b'{"prompt": "hi", "max_new_tokens": 100000000}', 422),
        (b'{"prompt": "hi", "surprise": 1}', 422), (b"[1, 2]", 422), (b'"hello"', 422),
    ]
    for body, status in cases:
        answer = client.post("/generate", content=body,
                             headers={"content-type": "application/json"})
        assert answer.status_code == status, body
        assert set(answer.json()) == {"error"}
    not_object = client.post("/generate", content=b'"hello"',
                             headers={"content-type": "application/json"})
    assert "must be a JSON object" in not_object.json()["error"]
    too_long = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 600})
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]


def test_a_bug_is_a_500_json_without_traceback(state, static_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model_api, "generate_ids", broken)
    client = TestClient(create_app(state, static_dir=static_dir), base_url="http://127.0.0.1",
                        raise_server_exceptions=False)
    answer = client.post("/generate", json={"prompt": "hi"})
    assert answer.status_code == 500 and "RuntimeError" in answer.json()["error"]
    assert "Traceback" not in answer.text and "boom" not in answer.text


# --- security --------------------------------------------------------------------------------

def test_token_is_required_everywhere(state, static_dir):
    state.token = TOKEN
    client = TestClient(create_app(state, static_dir=static_dir), base_url="http://127.0.0.1")
    for path in ("/health", "/chat", "/static/chat.js", "/docs", "/openapi.json", "/tasks/x"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    answer = client.get("/health", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200 and answer.json()["loaded"]
    assert client.post("/generate", json={"prompt": "hi"}).status_code == 401
    assert client.post("/generate?token=" + TOKEN, json={"prompt": "hi"}).status_code == 401


def test_token_in_the_query_once_sets_a_strict_cookie(state, static_dir):
    state.token = TOKEN
    client = TestClient(create_app(state, static_dir=static_dir), base_url="http://127.0.0.1",
                        follow_redirects=False)
    assert client.get("/chat?token=wrong").status_code == 401
    answer = client.get(f"/chat?token={TOKEN}&x=1")
    assert answer.status_code == 303 and answer.headers["location"] == "/chat?x=1"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert client.get("/chat").status_code == 200  # the cookie jar now holds it
    assert client.post("/generate/ids", json={"prompts": [[5]], "max_new_tokens": 1}
                       ).status_code == 200
    client.cookies.clear()
    client.cookies.set("residlab_token_80", "forged")
    assert client.get("/chat").status_code == 401
    redirect = client.get(f"//evil.example/x?token={TOKEN}")
    assert not redirect.headers.get("location", "/").startswith("//")


def test_token_cookie_survives_malformed_cookies_and_is_named_per_port(state, static_dir):
    state.token = TOKEN
    client = TestClient(create_app(state, static_dir=static_dir),
                        base_url="http://127.0.0.1:8765", follow_redirects=False)
    name, _, rest = client.get(f"/chat?token={TOKEN}").headers["set-cookie"].partition("=")
    value = rest.split(";")[0]
    assert name == "residlab_token_8765"
    assert value == hashlib.sha256(b"residlab-cookie:" + TOKEN.encode()).hexdigest()
    client.cookies.clear()
    for header in (f"x=a b; {name}={value}", f'x={{"a":1}}; {name}={value}',
                   f"{name}={value}; y=a b", f"  {name}={value} ;z"):
        assert client.get("/health", headers={"cookie": header}).status_code == 200, header
    for header in (f"residlab_token_9999={value}", f"x=a b; {name}=forged", f"{name}x={value}"):
        assert client.get("/health", headers={"cookie": header}).status_code == 401, header


def test_a_non_ascii_token_is_refused_at_startup(monkeypatch, capsys):
    from residlab import models
    from residlab.cli import main

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    for token in ("clé-secrète", "tab\there", " padded"):
        with pytest.raises(UsageError, match="ASCII"):
            resolve_token(token)
    monkeypatch.setenv("RESIDLAB_TOKEN", "pässwort")
    with pytest.raises(UsageError, match="ASCII"):
        resolve_token(None)
    assert main(["serve", "--model", "default"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ASCII" in err and "\n" not in err
    assert resolve_token("plain-ascii_token.1") == "plain-ascii_token.1"


def test_cross_origin_requests_that_change_things_are_refused(client):
    body = {"prompts": [[5]], "max_new_tokens": 1}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": "http://127.0.0.1:9999"},  # another port of this machine
                    {"Origin": "http://localhost:8765"}, {"Origin": "garbage"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"}):
        answer = client.post("/generate/ids", json=body, headers=headers)
        assert answer.status_code == 403, headers
        assert "another origin" in answer.json()["error"]
    for headers in ({}, {"Origin": "http://127.0.0.1:8765"}, {"Sec-Fetch-Site": "none"},
                    {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:8765"}):
        assert client.post("/generate/ids", json=body, headers=headers).status_code == 200, \
            headers
    cross = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert client.get("/health", headers=cross).status_code == 200  # it cannot read it


def test_a_cross_site_form_cannot_start_a_chat(client, state):
    form = b'{"messages": [{"role": "user", "content": "hi="}], "max_tokens": 2}'  # text/plain
    for headers in ({"content-type": "text/plain"}, {},
                    {"content-type": "application/x-www-form-urlencoded"}):
        answer = client.post("/api/chat", content=form, headers=headers)
        assert answer.status_code == 415, headers
        assert "application/json" in answer.json()["error"]
    browser = {"content-type": "text/plain", "Origin": "http://evil.example",
               "Sec-Fetch-Site": "cross-site"}
    assert client.post("/api/chat", content=form, headers=browser).status_code == 403
    assert client.post("/generate", content=b'{"prompt": "hi="}',
                       headers={"content-type": "text/plain"}).status_code == 415
    assert state.active_streams == 0
    own_page = {"content-type": "application/json", "Origin": "http://127.0.0.1:8765",
                "Sec-Fetch-Site": "same-origin"}
    answer = client.post("/api/chat", content=form, headers=own_page)
    assert answer.status_code == 200 and '"done":true' in answer.text


def test_docs_pages_are_off_and_the_openapi_document_is_served(client):
    assert client.get("/docs").status_code == 404
    assert client.get("/redoc").status_code == 404
    document = client.get("/openapi.json")
    assert document.status_code == 200 and "/generate" in document.json()["paths"]


def test_host_header_check_on_loopback(client, state, static_dir):
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765", "localhost"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example", ""):
        answer = client.get("/health", headers={"host": host})
        assert answer.status_code == 400 and "Host" in answer.json()["error"], host
    open_bind = TestClient(create_app(state, static_dir=static_dir, allowed_hosts=None),
                           base_url="http://evil.example")
    assert open_bind.get("/health").status_code == 200


def test_no_cors_headers(client):
    answer = client.get("/health", headers={"Origin": "http://evil.example"})
    assert not [k for k in answer.headers if k.lower().startswith("access-control")]
    preflight = client.options("/generate", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code >= 400
    assert not [k for k in preflight.headers if k.lower().startswith("access-control")]


def test_body_limit_with_and_without_content_length(state, static_dir):
    app = create_app(state, static_dir=static_dir, max_body_bytes=2048)
    body = json.dumps({"prompts": [[5] * 1500], "max_new_tokens": 1}).encode()
    small = json.dumps({"prompts": [[5, 6]], "max_new_tokens": 1}).encode()
    client = TestClient(app, base_url="http://127.0.0.1")
    assert client.post("/generate/ids", content=body,
                       headers={"content-type": "application/json"}).status_code == 413
    with serve_in_thread(app) as url:
        head = "POST /generate/ids HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
        status, payload = raw_request(url, head + f"Content-Length: {len(body)}\n"
                                      "Connection: close\n", body)
        assert status == 413 and "error" in json.loads(payload)

        def chunked(data: bytes) -> bytes:
            parts = [data[i:i + 500] for i in range(0, len(data), 500)]
            return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"

        head += "Transfer-Encoding: chunked\nConnection: close\n"
        status, payload = raw_request(url, head, chunked(body))
        assert status == 413
        status, payload = raw_request(url, head, chunked(small))  # a small chunked body works
        assert status == 200, payload


def test_static_routes_serve_only_listed_files(state, static_dir):
    app = create_app(state, static_dir=static_dir)
    with serve_in_thread(app) as url:
        ok = httpx.get(f"{url}/static/chat.js")
        assert ok.status_code == 200 and ok.text == "console.log('chat');"
        assert ok.headers["x-content-type-options"] == "nosniff"
        assert ok.headers["content-type"].startswith("text/javascript")
        assert httpx.get(f"{url}/static/vendor/lib.js").status_code == 200
        page = httpx.get(f"{url}/chat")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for path in ("/static/../secret.txt", "/static/%2e%2e/secret.txt",
                     "/static/%2e%2e%2fsecret.txt", "/static/vendor/../../secret.txt",
                     "/static/link.txt", "/static/vendor/link.js", "/static/sub/deep.js",
                     "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/static/" + str(
                         static_dir / "chat.js"), "/static/vendor/%2e%2e/%2e%2e/secret.txt"):
            status, payload = raw_request(url, f"GET {path} HTTP/1.1\nHost: 127.0.0.1\n"
                                          "Connection: close\n")
            assert status == 404, path
            assert SECRET.encode() not in payload and b"console" not in payload, path


def test_client_against_a_real_server(state, static_dir, tiny_llama):
    state.token = TOKEN
    with serve_in_thread(create_app(state, static_dir=static_dir)) as url:
        with pytest.raises(ServerError) as refused:
            ResidlabClient(url, token="wrong").health()
        assert refused.value.status == 401
        with ResidlabClient(url, token=TOKEN) as remote:
            assert remote.health()["n_layers"] == 4
            assert remote.model_info()["variant"] == "base"
            plain = remote.generate("Hi", max_new_tokens=3)["results"][0]
            captured = remote.generate_with_capture("Hi", max_new_tokens=3, layers="0")
            assert captured["results"][0]["token_ids"] == plain["token_ids"]
            assert captured["results"][0]["activations"]["response.layer0.residual"].shape[1] == 64
            zero = remote.generate_with_steering("Hi", max_new_tokens=3, vectors=[
                {"layer": 1, "vector": [1.0] * 64, "coefficient": 0.0}])
            assert zero["results"][0]["token_ids"] == plain["token_ids"]
            (out,) = remote.generate_ids([plain["token_ids"][:plain["prompt_end"]]],
                                         max_new_tokens=3)
            assert plain["token_ids"][plain["prompt_end"]:] == out.token_ids
            assert remote.generation_settings(max_new_tokens=3)["max_new_tokens"] == 3
            task = remote.capture("nothing-here")
            assert remote.wait(task["id"])["status"] == "error"
            with pytest.raises(ServerError) as unknown:
                remote.task("unknown")
            assert unknown.value.status == 404


# --- serve command ---------------------------------------------------------------------------

def test_serve_refuses_a_public_bind_without_token(monkeypatch):
    from residlab import models

    monkeypatch.delenv("RESIDLAB_TOKEN", raising=False)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(UsageError, match="--token"):
        run_serve(ServeOptions(host="0.0.0.0", model="default"))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    check_bind("0.0.0.0", TOKEN)  # with a token it may
    check_bind("127.0.0.1", None)


def test_serve_on_a_public_host_without_token_is_one_line_exit_2(monkeypatch, capsys):
    from residlab import models
    from residlab.cli import main

    monkeypatch.delenv("RESIDLAB_TOKEN", raising=False)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["serve", "--host", "0.0.0.0", "--model", "default"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--token" in err and "\n" not in err and "Traceback" not in err


def test_serve_answers_to_the_loopback_address_it_binds(monkeypatch, tiny_llama):
    import uvicorn

    from residlab import models

    started: list = []
    monkeypatch.delenv("RESIDLAB_TOKEN", raising=False)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: tiny_llama)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append((app, kw)))
    run_serve(ServeOptions(host="127.0.0.2", port=8765, model="default"))
    ((app, where),) = started
    assert where["host"] == "127.0.0.2"
    client = TestClient(app, base_url="http://127.0.0.2:8765")
    assert client.get("/health").status_code == 200
    for host in ("localhost:8765", "127.0.0.1"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host
    for host in ("127.0.0.3:8765", "evil.example"):
        assert client.get("/health", headers={"host": host}).status_code == 400, host
    assert client.post("/model/load", json={"model": "default"}).status_code == 403
    run_serve(ServeOptions(host="127.0.0.2", model="default", allow_model_load=True))
    opened = TestClient(started[-1][0], base_url="http://127.0.0.2:8765")
    answer = opened.post("/model/load", json={"model": "default", "device": "cuda:99"})
    assert answer.status_code == 400 and "cuda:99" in answer.json()["error"]  # not refused


def test_health_answers_while_the_model_is_busy(state, static_dir):
    answers: list[int] = []
    with serve_in_thread(create_app(state, static_dir=static_dir)) as url:
        with state.model_lock:  # as a long generation would hold it
            waiting = threading.Thread(target=lambda: answers.append(httpx.post(
                f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 2},
                timeout=30).status_code))
            waiting.start()
            time.sleep(0.3)
            assert httpx.get(f"{url}/health", timeout=2).status_code == 200
            assert waiting.is_alive() and answers == []  # queued on the model
        waiting.join(timeout=30)
    assert answers == [200]
