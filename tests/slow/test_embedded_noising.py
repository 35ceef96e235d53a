"""End to end on the embedded SmolLM2-135M-Instruct (slow; part of make test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from conftest import chat_ids
from residlab.arch import resolve_arch
from residlab.generation import generate_ids, stop_token_ids
from residlab.hooks import Add, Capture
from residlab.noising.runs import RunDir

pytestmark = pytest.mark.slow

TEXTS = ["What is the capital of France?", "Write a haiku about rain.",
         "Explain recursion to a child in two sentences.", "hi"]


def test_embedded_model_shape(embedded):
    arch = resolve_arch(embedded.model)
    assert (arch.family, arch.n_layers, arch.d_model) == ("llama", 30, 576)
    assert embedded.provenance["source"] == "embedded-gguf"
    assert len(embedded.provenance["sha256"]) == 64


def test_zero_noise_is_plain_generate(embedded):
    prompts = chat_ids(embedded.tokenizer, TEXTS)
    stops = stop_token_ids(embedded.model, embedded.tokenizer)
    got = generate_ids(embedded.model, embedded.tokenizer, prompts, max_new_tokens=20,
                       interventions=[Add(10, torch.zeros(len(prompts), 576))])
    for ids, generated in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = embedded.model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                          eos_token_id=stops, pad_token_id=stops[0])
        plain = out[0, len(ids):].tolist()
        assert generated.token_ids == plain[: len(generated.token_ids)]
        assert len(generated.token_ids) == len(plain) or generated.finish_reason == "stop"


def test_batched_noise_equals_per_prompt(embedded):
    prompts = chat_ids(embedded.tokenizer, TEXTS)
    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(len(prompts), 576), dim=-1) * 6.0
    batched = generate_ids(embedded.model, embedded.tokenizer, prompts, max_new_tokens=16,
                           interventions=[Add(12, vectors)])
    for row, ids in enumerate(prompts):
        single = generate_ids(embedded.model, embedded.tokenizer, [ids], max_new_tokens=16,
                              interventions=[Add(12, vectors[row])])
        assert single[0] == batched[row]


def test_added_vector_norm_on_embedded(embedded):
    prompts = chat_ids(embedded.tokenizer, TEXTS)
    vectors = torch.nn.functional.normalize(torch.randn(len(prompts), 576), dim=-1) * 12.5
    before, after = Capture(5, "resid_pre"), Capture(5, "resid_pre")
    generate_ids(embedded.model, embedded.tokenizer, prompts, max_new_tokens=4,
                 interventions=[before, Add(5, vectors), after])
    diff = after.values() - before.values()
    mask = after.mask()
    torch.testing.assert_close(diff[mask].norm(dim=-1), torch.full((int(mask.sum()),), 12.5),
                               atol=1e-4, rtol=1e-5)
    assert torch.all(diff[~mask] == 0)


def _config(tmp_path, **changes):
    config = dict(model_name="default", dtype="fp32", num_prompts=6, batch_size=6,
                  max_new_tokens=12, layer_index=8, noise_norms=[0.0, 8.0, 32.0],
                  num_noise_vectors=3, seed=1, output_dir=str(tmp_path / "out"),
                  cov_batches=2, max_prompt_len=128)
    config.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(*args, cwd, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "residlab", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def _records(run_dir):
    return sorted(line for path in RunDir(run_dir).gens_files()
                  for line in path.read_text().splitlines())


def test_covariance_then_shaped_sweep_then_kill_and_resume(tmp_path):
    config = _config(tmp_path)
    cov_dir = _cli("noise", "covariance", "--config", str(config), cwd=tmp_path)
    cov_dir = tmp_path / cov_dir.stdout.split("covariance: ")[1].strip()
    cov, root = np.load(cov_dir / "cov.npy"), np.load(cov_dir / "cov_sqrt.npy")
    assert cov.shape == (576, 576)
    np.testing.assert_allclose(root @ root, cov, atol=1e-6 * np.abs(cov).max())

    done = _cli("noise", "generate", "--config", str(config), cwd=tmp_path)
    full_run = tmp_path / done.stdout.split("run: ")[1].strip()
    saved = yaml.safe_load((full_run / "config.yaml").read_text())
    assert saved["noise_shaping"]["cov_sqrt"].endswith("cov_sqrt.npy")
    records = [json.loads(line) for line in _records(full_run)]
    assert len(records) == 3 * 3 * 6
    noise = np.load(RunDir(full_run).noise_file(1))
    assert abs(np.linalg.norm(noise) - 1) < 1e-9

    # Kill a second, identical run after its first shard lands, then resume it.
    other = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "residlab", "noise", "generate", "--config", str(config),
         "--output_dir", str(other), "--cov-sqrt", str(cov_dir / "cov_sqrt.npy")],
        cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(other.glob("*/shards/shard_*.jsonl")):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (run_dir,) = other.iterdir()
    assert not RunDir(run_dir).gens_files(), "killed before the end"
    _cli("noise", "generate", "--resume", str(run_dir), cwd=tmp_path)
    assert _records(run_dir) == _records(full_run)
