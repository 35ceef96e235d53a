"""The whole model diff on the embedded model and a small LoRA made here (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from residlab.analysis.model_diff.run import run_diff
from residlab.experiments import load_experiment
from residlab.traits.vectors import TraitVector, save_vector

pytestmark = pytest.mark.slow

TRAIT, LAYERS, BEST = "test/warmth", (8, 15, 22), 15
PROMPTS = [{"id": str(i), "prompt": text} for i, text in enumerate(
    ["Name a colour.", "What is two plus two?", "Say hello to a friend.", "Describe rain."])]


@pytest.fixture
def experiment(tmp_path, monkeypatch):
    """Variants ``base`` (the embedded model) and ``tuned`` (+ a random rank-4 LoRA), one
    stored trait vector per layer in LAYERS (the best at BEST), a 4-prompt set."""
    from peft import LoraConfig, get_peft_model

    from residlab.models import load_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    torch.manual_seed(5)
    model = load_model("default", dtype="fp32", device="cpu").model
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "lora")
    cpu = {"model": "default", "dtype": "fp32", "device": "cpu"}
    folder = tmp_path / "experiments" / "e"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_variants": {"base": cpu, "tuned": {**cpu, "lora": str(tmp_path / "lora")}},
        "defaults": {"application": "base", "extraction": "base"}}))
    (tmp_path / "datasets" / "inference").mkdir(parents=True)
    (tmp_path / "datasets" / "inference" / "four.json").write_text(json.dumps(PROMPTS))
    experiment = load_experiment("e")
    generator = torch.Generator().manual_seed(1)
    for layer in LAYERS:
        save_vector(experiment, TraitVector(
            TRAIT, "base", "response[:5]", "residual", "mean_diff", layer,
            torch.randn(576, generator=generator),
            {"effect_size": 2.0 if layer == BEST else 0.5, "accuracy": 1.0}))
    return experiment


def _files(root) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.name != "_provenance.json"}


def test_run_diff_on_embedded_model(experiment):
    run = run_diff(experiment, "base", "tuned", "four", max_new_tokens=8, layers="8,15,22")
    assert run.same_weights and run.written["capture"] == 8 and len(run.logprobs) == 4
    results = json.loads(run.results.read_text())["traits"][TRAIT]
    assert results["layers"] == list(LAYERS)
    per_token = run.out_dir / "per_token_diff" / TRAIT / f"L{BEST}" / "four"
    deltas = np.array([json.loads((per_token / f"{p['id']}.json").read_text())["mean_delta"]
                       for p in PROMPTS])  # (4,) per prompt: mean over tokens of B - A
    assert np.abs(deltas).max() > 1e-3  # the adapter moved the projections
    # projections are linear: the mean of the per-token deltas is the delta of the projection
    # of the mean activation, so the paired effect size follows from the per-token files
    paired = results["per_layer_paired_effect_size"][LAYERS.index(BEST)]
    np.testing.assert_allclose(paired, deltas.mean() / deltas.std(), rtol=1e-3)
    for prompt in PROMPTS:
        scored = json.loads((run.out_dir / "logprobs" / "four" / f"{prompt['id']}.json")
                            .read_text())
        tokens = json.loads((per_token / f"{prompt['id']}.json").read_text())["tokens"]
        assert len(scored["delta"]) == len(tokens) and np.isfinite(scored["kl"]).all()
        assert min(scored["kl"]) >= -1e-5
    before = _files(experiment.path)
    again = run_diff(experiment, "base", "tuned", "four", max_new_tokens=8, layers="8,15,22")
    assert sum(again.written.values()) == 0 and _files(experiment.path) == before
