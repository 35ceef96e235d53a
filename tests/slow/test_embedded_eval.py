"""Evaluation on the embedded model against one plain forward per example (fp32, 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch

from residlab.config import NoisingConfig
from residlab.noising.eval import run_eval
from residlab.noising.generate import run_generate
from residlab.noising.runs import RunDir

pytestmark = pytest.mark.slow


def test_eval_logprobs_equal_plain_forward(tmp_path, embedded):
    cfg = NoisingConfig(model_name="default", dtype="fp32", num_prompts=5, batch_size=8,
                        max_new_tokens=24, layer_index=10, noise_norms=[0.0, 64.0],
                        num_noise_vectors=2, seed=2, output_dir=str(tmp_path))
    run_dir = run_generate(cfg, loaded=embedded)
    out, skipped = run_eval(cfg, run_dir, loaded=embedded)
    assert not skipped
    gens = {(g["noise_id"], g["noise_scale"], g["prompt_index"]): g
            for path in RunDir(run_dir).gens_files()
            for g in map(json.loads, path.read_text().splitlines())}
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == len(gens) == 5 * 2 * 2
    stops = 0
    for record in records:
        gen = gens[record["noise_id"], record["noise_scale"], record["prompt_index"]]
        prompt, response = gen["prompt_token_ids"], gen["response_token_ids"]
        with torch.no_grad():
            logits = embedded.model(torch.tensor([prompt + response])).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        expected = [logprobs[len(prompt) + i - 1, token].item() for i, token in enumerate(response)]
        assert record["per_token_logprobs"] == pytest.approx(expected, abs=1e-4)
        stops += gen["finish_reason"] == "stop"
        if gen["finish_reason"] == "stop":  # the end-of-turn token is scored too
            assert response[-1] == embedded.tokenizer.eos_token_id
            assert record["n_tokens"] == len(response)
    by_scale = {s: [r["mean_logprob"] for r in records if r["noise_scale"] == s]
                for s in (0.0, 64.0)}
    assert sum(by_scale[64.0]) < sum(by_scale[0.0])  # noise makes text less likely
