"""``residlab responses`` Mode A through a running model server: the same files as a local run,
and a local load whenever the server cannot stand in (other model, wrong token, none there)."""

from __future__ import annotations

import json
import logging
import re
import socket
from pathlib import Path

import pytest
import yaml

from residlab import experiments
from residlab.cli import main
from residlab.experiments import load_experiment, load_variant
from residlab.generation import generate_ids
from residlab.models import load_model
from residlab.server import model_api
from residlab.server.app import create_app
from residlab.server.state import ServerState
from test_server_api import TOKEN, serve_in_thread

ARGS = ["responses", "--experiment", "exp", "--prompt-set", "baseline", "--max-new-tokens", "6",
        "--batch-size", "2"]


@pytest.fixture
def experiment(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    monkeypatch.delenv("RESIDLAB_TOKEN", raising=False)
    cpu = {"model": str(tiny_llama_dir), "dtype": "fp32", "device": "cpu"}
    (tmp_path / "experiments" / "exp").mkdir(parents=True)
    (tmp_path / "experiments" / "exp" / "config.yaml").write_text(yaml.safe_dump(
        {"model_variants": {"base": cpu}, "defaults": {"application": "base"}}))
    return load_experiment("exp")


@pytest.fixture
def server_calls(monkeypatch) -> list[int]:
    """How many prompts the server generated for, per call of ``/generate/ids``."""
    calls: list[int] = []

    def counted(model, tokenizer, prompts, **kwargs):
        calls.append(len(prompts))
        return generate_ids(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(model_api, "generate_ids", counted)
    return calls


def _without_date(path: Path) -> bytes:
    return re.sub(rb'"capture_date": "[^"]*"', b'"capture_date": ""', path.read_bytes())


def _no_local_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded locally although the server serves it")

    monkeypatch.setattr(experiments, "load_variant", refuse)


def test_mode_a_through_the_server_writes_the_local_files(experiment, monkeypatch,
                                                         server_calls):
    state = ServerState(loaded=load_variant(experiment, "base"), experiment=experiment,
                        variant="base")
    with serve_in_thread(create_app(state)) as url:
        monkeypatch.setenv("RESIDLAB_SERVER", url)
        with monkeypatch.context() as patched:
            _no_local_load(patched)
            assert main([*ARGS, "--output-suffix", "server"]) == 0
        assert server_calls == [2, 2, 1]  # the local batches, one request each
        assert main([*ARGS, "--output-suffix", "local", "--no-server"]) == 0
        assert server_calls == [2, 2, 1]  # --no-server: the server was not asked
    served = sorted(experiment.responses_dir("base", "baseline_server").glob("*.json"))
    local = sorted(experiment.responses_dir("base", "baseline_local").glob("*.json"))
    assert [p.name for p in served] == [p.name for p in local] and len(local) == 5
    for a, b in zip(served, local, strict=True):
        assert _without_date(a) == _without_date(b), a.name
    record = json.loads(served[0].read_text())
    assert record["source"] == "generated" and record["model_identity"]["dtype"] == "float32"


def test_a_server_with_another_model_is_not_used(experiment, monkeypatch, server_calls,
                                                 tiny_gpt2_dir, caplog):
    state = ServerState(loaded=load_model(str(tiny_gpt2_dir), dtype="fp32", device="cpu"))
    with serve_in_thread(create_app(state)) as url:
        monkeypatch.setenv("RESIDLAB_SERVER", url)
        with caplog.at_level(logging.INFO, logger="residlab.client"):
            assert main([*ARGS, "--limit", "1"]) == 0
    assert server_calls == []
    assert "not using the model server" in caplog.text and "model=" in caplog.text
    assert len(list(experiment.responses_dir("base", "baseline").glob("*.json"))) == 1


def test_a_server_with_a_token(experiment, monkeypatch, server_calls, caplog):
    state = ServerState(loaded=load_variant(experiment, "base"), token=TOKEN)
    with serve_in_thread(create_app(state)) as url:
        monkeypatch.setenv("RESIDLAB_SERVER", url)
        monkeypatch.setenv("RESIDLAB_TOKEN", "wrong")
        with caplog.at_level(logging.INFO, logger="residlab.client"):
            assert main([*ARGS, "--limit", "1", "--output-suffix", "a"]) == 0
        assert server_calls == [] and "401" in caplog.text
        monkeypatch.setenv("RESIDLAB_TOKEN", TOKEN)
        with monkeypatch.context() as patched:
            _no_local_load(patched)
            assert main([*ARGS, "--limit", "1", "--output-suffix", "b"]) == 0
        assert server_calls == [1]


def test_no_server_there_loads_locally(experiment, monkeypatch, server_calls):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # a port nobody listens on
    monkeypatch.setenv("RESIDLAB_SERVER", f"http://127.0.0.1:{port}")
    assert main([*ARGS, "--limit", "2"]) == 0
    assert len(list(experiment.responses_dir("base", "baseline").glob("*.json"))) == 2
