"""Logit lens and attention on the embedded model against its own forward (slow; make test)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from residlab.cli import main
from residlab.experiments import load_experiment
from residlab.inference import attention_patterns, generate_responses, logit_lens
from residlab.inference.attention import eager_attention
from residlab.inference.extract_viz import viz_dir

pytestmark = pytest.mark.slow


def _ids(embedded) -> list[int]:
    text = "The capital of France is Paris. The capital of Italy is"
    return embedded.tokenizer(text)["input_ids"]


def test_lens_at_the_last_layer_is_the_models_softmax(embedded):
    ids = _ids(embedded)
    readout = logit_lens(embedded, ids, layers=[-1], top_k=10)
    with torch.inference_mode():
        probs = embedded.model(torch.tensor([ids])).logits[0, :-1].softmax(-1)  # (T-1, V)
    top = probs.topk(10, dim=-1)
    assert torch.equal(readout.top_ids[1], top.indices)
    torch.testing.assert_close(readout.top_probs[1], top.values, atol=1e-5, rtol=0)
    own = probs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(readout.actual_prob[1], own, atol=1e-5, rtol=0)
    ranks = (probs > own[:, None]).sum(-1) + 1
    assert torch.equal(readout.actual_rank[1], ranks)
    assert readout.layers == ["embed", 29]


def test_attention_equals_eager_output_attentions(embedded):
    ids = _ids(embedded)
    weights = attention_patterns(embedded, ids, layers=[3, 5])  # (2, 9, T, T)
    with eager_attention(embedded.model), torch.inference_mode():
        expected = embedded.model(torch.tensor([ids]), output_attentions=True).attentions
    assert weights.shape == (2, 9, len(ids), len(ids))  # 9 query heads, 3 key/value heads
    torch.testing.assert_close(weights[0], expected[3][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(weights[1], expected[5][0], atol=1e-5, rtol=0)
    assert np.allclose(weights.sum(-1).numpy(), 1, atol=1e-5)
    assert embedded.model.config._attn_implementation != "eager"  # put back


def test_command_stores_exactly_the_requested_layers(tmp_path, monkeypatch, embedded, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.yaml").write_text(yaml.safe_dump(
        {"model_variants": {"instruct": {"model": "default", "dtype": "fp32", "device": "cpu"}}}))
    experiment = load_experiment("e")
    generate_responses(experiment, "harmful", max_new_tokens=8, limit=2, loaded=embedded)
    argv = ["extract-viz", "--experiment", "e", "--prompt-set", "harmful", "--attention",
            "--logit-lens", "--layers", "3,5", "--top-k", "5"]
    assert main(argv) == 0
    folder = viz_dir(experiment, "instruct", "harmful")
    responses = experiment.responses_dir("instruct", "harmful")
    first, second = sorted(path.stem for path in responses.iterdir())
    files = sorted(path.name for path in folder.iterdir())
    assert files == [f"{first}_attention.safetensors", f"{first}_logit_lens.json",
                     f"{second}_attention.safetensors", f"{second}_logit_lens.json",
                     "_command.yaml"]
    lens = json.loads((folder / f"{first}_logit_lens.json").read_text())
    assert lens["layers"] == ["embed", 3, 5] and lens["n_layers"] == 30
    assert {entry["layer"] for p in lens["predictions"] for entry in p["by_layer"]} == {
        "embed", 3, 5}
    with safe_open(str(folder / f"{first}_attention.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("attention").shape[:2] == (2, 9)
        assert json.loads(handle.metadata()["layers"]) == [3, 5]
