"""Responses and capture on the embedded model (slow; part of make test)."""

from __future__ import annotations

import pytest
import torch
import yaml

from residlab.experiments import load_experiment
from residlab.inference import capture_prompt_set, generate_responses, load_raw

pytestmark = pytest.mark.slow


def test_capture_on_embedded_model(tmp_path, monkeypatch, embedded):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.yaml").write_text(yaml.safe_dump(
        {"model_variants": {"instruct": {"model": "default", "dtype": "fp32", "device": "cpu"}}}))
    experiment = load_experiment("e")
    generate_responses(experiment, "harmful", max_new_tokens=12, loaded=embedded)
    full = capture_prompt_set(experiment, "harmful", dtype="fp32", loaded=embedded, batch_size=5)
    for path in full.written[:2]:
        raw = load_raw(path)
        ids = raw["prompt"]["token_ids"] + raw["response"]["token_ids"]
        with torch.no_grad():
            hidden = embedded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in (0, 14, 28):
            got = torch.cat([raw[p]["activations"][layer]["residual"]
                             for p in ("prompt", "response")])
            torch.testing.assert_close(got, hidden[layer + 1][0], atol=2e-4, rtol=1e-4)
    # Storage: bf16 tensors, at most 5% over the raw tensor bytes (token metadata included).
    stored = capture_prompt_set(experiment, "harmful", loaded=embedded, layers="10-20:5",
                                response_only=True)
    for path in stored.written:
        raw = load_raw(path)
        tensors = [t for comps in raw["response"]["activations"].values() for t in comps.values()]
        payload = sum(t.numel() * t.element_size() for t in tensors)
        assert path.stat().st_size <= 1.05 * payload
