"""``residlab serve --ray``: replica planning, the replicated app's refusals, bad input, and a
real deployment on a local Ray (two CPU replicas of a tiny Llama behind Serve's proxy)."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from residlab.cli import main  # noqa: E402
from residlab.errors import UsageError  # noqa: E402
from residlab.server.app import create_app  # noqa: E402
from residlab.server.ray_serve import plan_replicas  # noqa: E402
from residlab.server.state import ServerState  # noqa: E402

LOCAL = "http://127.0.0.1"


def test_one_replica_per_gpu_and_no_more():
    assert plan_replicas(None, 4) == (4, 1.0)
    assert plan_replicas(2, 4.0) == (2, 1.0)
    assert plan_replicas(None, 0) == (1, 0.0)
    assert plan_replicas(3, 0) == (3, 0.0)  # CPU replicas: as many as asked
    with pytest.raises(UsageError, match="--replicas 5 needs 5 GPUs .* the cluster has 4"):
        plan_replicas(5, 4)


def test_a_replica_refuses_what_needs_one_process():
    client = TestClient(create_app(ServerState(), replicated=True), base_url=LOCAL)
    for method, path in (("post", "/capture"), ("post", "/extract-viz"),
                         ("get", "/tasks/abc"), ("post", "/model/load")):
        answer = getattr(client, method)(path, **({"json": {}} if method == "post" else {}))
        assert answer.status_code == 409, (path, answer.text)
        assert "single server process" in answer.json()["error"]
    assert client.get("/health").json()["status"] == "ok"  # the rest is served as usual
    plain = TestClient(create_app(ServerState()), base_url=LOCAL)
    assert plain.get("/tasks/abc").status_code == 404


def test_replicas_without_ray_is_one_line(capsys):
    assert main(["serve", "--replicas", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "add --ray" in err and "\n" not in err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_replicas_serve_the_model_behind_one_address(tiny_llama_dir):
    """Two replicas on a local Ray: /health through Serve's proxy names the model, and a
    generation equals the same request to a plain in-process app."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from residlab.commands.serve import ServeOptions, replica_app
    from residlab.server.ray_serve import deploy

    port = _free_port()
    options = ServeOptions(model=str(tiny_llama_dir), dtype="fp32", device="cpu", port=port,
                           ray=True, replicas=2)
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False,
             log_to_driver=False)
    try:
        assert deploy(options, None, replica_app, blocking=False) == (2, 0.0)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"{base}/health", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the deployment did not answer"
            time.sleep(0.5)
        assert health.json()["loaded"] and health.json()["device"] == "cpu"
        body = {"prompt": "Hello there", "max_new_tokens": 5, "chat_template": False}
        served = httpx.post(f"{base}/generate", json=body, timeout=60)
        assert served.status_code == 200, served.text
        assert httpx.post(f"{base}/model/load", json={}, timeout=10).status_code == 409
    finally:
        serve.shutdown()
        ray.shutdown()
    from residlab.commands.serve import app_for, build_state

    local = TestClient(app_for(options, build_state(options, None)), base_url=LOCAL)
    assert served.json() == local.post("/generate", json=body).json()
