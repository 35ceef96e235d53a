"""The noising runner end to end on a tiny model: layout, records, resume, covariance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from residlab.config import NoisingConfig
from residlab.generation import generate_ids, left_pad
from residlab.hooks import Capture, intervene
from residlab.noising import generate as noising_generate
from residlab.noising.covariance import fit_covariance, run_covariance
from residlab.noising.generate import load_run_prompts, run_generate
from residlab.noising.runs import RunDir


def _config(tmp_path, model_dir, **changes) -> NoisingConfig:
    base = dict(model_name=str(model_dir), dtype="fp32", device="cpu", num_prompts=5,
                max_prompt_len=64, batch_size=4, max_new_tokens=6, layer_index=1,
                noise_norms=[0.0, 2.0, 8.0], num_noise_vectors=3, seed=11,
                output_dir=str(tmp_path / "out"))
    return NoisingConfig(**{**base, **changes})


def _records(run_dir) -> list[dict]:
    rows = []
    for path in RunDir(run_dir).gens_files():
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def test_run_layout_and_records(tmp_path, tiny_llama, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir)
    run_dir = run_generate(cfg, loaded=tiny_llama)
    run = RunDir(run_dir)
    assert [p.name for p in run.gens_files()] == [f"gens_noise_{i:04d}.jsonl" for i in range(3)]
    assert not (run_dir / "shards").exists()
    saved = yaml.safe_load(run.config_file.read_text())
    assert saved["layer_index"] == 1 and saved["provenance"]["source"] == "local"
    assert saved["noise_shaping"]["shaped"] is False
    records = _records(run_dir)
    assert len(records) == 3 * 3 * 5
    keys = {(r["noise_id"], r["noise_scale"], r["prompt_index"]) for r in records}
    assert len(keys) == len(records)
    needed = {"assistant_text", "noise_id", "noise_scale", "prompt_index", "messages",
              "prompt_text", "prompt_token_ids", "response_token_ids", "finish_reason"}
    assert all(needed <= set(r) for r in records)
    # Oracle: regenerate a few rows one at a time with the saved noise vector.
    prompts = {p.index: p for p in run.read_prompts()}
    for record in records[::7]:
        vector = np.load(run.noise_file(record["noise_id"])) * record["noise_scale"]
        from residlab.hooks import Add

        single = generate_ids(tiny_llama.model, tiny_llama.tokenizer,
                              [prompts[record["prompt_index"]].token_ids], max_new_tokens=6,
                              interventions=[Add(1, torch.tensor(vector, dtype=torch.float32))])
        assert single[0].token_ids == record["response_token_ids"]
        assert single[0].finish_reason == record["finish_reason"]
    np.testing.assert_allclose(np.linalg.norm(np.load(run.noise_file(0))), 1.0, atol=1e-12)


def test_killed_run_resumes_to_the_same_records(tmp_path, tiny_llama, tiny_llama_dir, monkeypatch):
    cfg = _config(tmp_path, tiny_llama_dir)
    complete = _records(run_generate(cfg, loaded=tiny_llama))

    real = noising_generate.generate_shard
    calls = {"n": 0}

    def dies_on_third_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(noising_generate, "generate_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        run_generate(cfg.model_copy(update={"output_dir": str(tmp_path / "b")}), loaded=tiny_llama)
    (run_dir,) = (tmp_path / "b").iterdir()
    assert len(list((run_dir / "shards").glob("*.jsonl"))) == 2
    assert not list((run_dir / "shards").glob(".*"))  # no half-written temp files left
    monkeypatch.setattr(noising_generate, "generate_shard", real)
    calls["n"] = 0
    run_generate(resume=run_dir, loaded=tiny_llama)
    assert sorted(map(json.dumps, _records(run_dir))) == sorted(map(json.dumps, complete))
    again = run_generate(resume=run_dir, loaded=tiny_llama)  # finished: nothing added
    assert len(_records(again)) == len(complete)


def test_gpt2_layout_and_positions(tmp_path, tiny_gpt2, tiny_gpt2_dir):
    cfg = _config(tmp_path, tiny_gpt2_dir, site="resid_post", positions="generated",
                  noise_norms=[0.0], num_noise_vectors=1)
    records = _records(run_generate(cfg, loaded=tiny_gpt2))
    assert len(records) == 5 and {r["noise_scale"] for r in records} == {0.0}


def test_covariance_equals_numpy_on_captured_vectors(tmp_path, tiny_llama, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir, cov_batches=2, batch_size=3)
    prompts = load_run_prompts(cfg.model_copy(update={"num_prompts": 6}), tiny_llama.tokenizer)
    estimate = fit_covariance(tiny_llama, cfg, prompts)
    # Oracle: hidden_states[L] (= resid_pre of block L) of each prompt alone, no padding at all.
    rows = []
    for prompt in prompts:
        with torch.no_grad():
            out = tiny_llama.model(torch.tensor([prompt.token_ids]), output_hidden_states=True)
        rows.append(out.hidden_states[cfg.layer_index][0].double().numpy())
    stacked = np.concatenate(rows)
    assert estimate.count == stacked.shape[0]
    np.testing.assert_allclose(estimate.cov, np.cov(stacked, rowvar=False), atol=1e-5, rtol=1e-4)

    cov_dir = run_covariance(cfg, loaded=tiny_llama)
    cov, root = np.load(cov_dir / "cov.npy"), np.load(cov_dir / "cov_sqrt.npy")
    np.testing.assert_allclose(root @ root, cov, atol=1e-8)
    # Generation picks the estimate up and records which file it used.
    run_dir = run_generate(cfg.model_copy(update={"num_prompts": 2}), loaded=tiny_llama)
    shaping = yaml.safe_load((run_dir / "config.yaml").read_text())["noise_shaping"]
    assert (shaping["shaped"], shaping["cov_sqrt"]) == (True, str(cov_dir / "cov_sqrt.npy"))
    assert shaping["estimate"] == json.loads((cov_dir / "estimate.json").read_text())


def test_exclude_first_drops_one_token_per_prompt(tmp_path, tiny_llama, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir, cov_batches=1, batch_size=3)
    prompts = load_run_prompts(cfg.model_copy(update={"num_prompts": 3}), tiny_llama.tokenizer)
    every = fit_covariance(tiny_llama, cfg, prompts)
    skipped = fit_covariance(tiny_llama, cfg.model_copy(update={"cov_exclude_first": True}),
                             prompts)
    assert every.count - skipped.count == 3
    # The dropped rows are exactly the first real token of each prompt.
    ids, mask = left_pad([p.token_ids for p in prompts], tiny_llama.tokenizer.pad_token_id, "cpu")
    capture = Capture(cfg.layer_index, "resid_pre")
    with torch.no_grad(), intervene(tiny_llama.model, [capture]):
        tiny_llama.model(input_ids=ids, attention_mask=mask)
    keep = mask.bool().clone()
    keep[torch.arange(3), mask.argmax(dim=1)] = False
    vectors = capture.values()[keep].double().numpy()
    np.testing.assert_allclose(skipped.cov, np.cov(vectors, rowvar=False), atol=1e-5, rtol=1e-4)


def test_plan_covers_every_combination_once():
    from residlab.noising.runs import plan_shards
    from residlab.prompts import ChatPrompt

    prompts = [ChatPrompt(i, [], "", list(range(n))) for i, n in enumerate([5, 9, 7])]
    for share in (False, True):
        shards = plan_shards(prompts, 4, [0.0, 1.0, 2.0], 5, share_zero=share)
        assert all(len(shard) <= 5 for shard in shards)
        rows = [row for shard in shards for row in shard]
        covered = [(r.prompt, v, r.scale) for r in rows for v in (r.noise_id, *r.shared_with)]
        assert sorted(covered) == sorted((p, v, s) for p in range(3) for v in range(4)
                                         for s in range(3))
        assert len(rows) == (3 * 4 * 3 if not share else 3 * (4 * 2 + 1))
        assert [r.prompt for r in rows][:1] == [1]  # longest prompt first
