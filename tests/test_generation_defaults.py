"""Generation settings are ours: a checkpoint's generation_config.json changes nothing under
``generation_defaults="plain"``, and applies on purpose under ``"model"``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import chat_ids, load_fp32
from residlab.config import NoisingConfig
from residlab.errors import UsageError
from residlab.generation import effective_generation_settings, generate_ids, stop_token_ids
from residlab.noising.generate import run_generate
from residlab.noising.runs import RunDir

TEXTS = ["Explain how tides work.", "hi", "How do I bake bread at home?"]
NEW = 16
# Settings a real checkpoint might ship; each one would change a greedy decode.
SHIPPED = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "do_sample": True,
           "temperature": 0.3, "min_p": 0.2}


@pytest.fixture(scope="module")
def opinionated(tiny_llama_dir, tmp_path_factory):
    """The tiny llama with a generation_config.json full of opinions."""
    path = tmp_path_factory.mktemp("models") / "opinionated-llama"
    shutil.copytree(tiny_llama_dir, path)
    config_file = path / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **SHIPPED}))
    loaded = load_fp32(path)
    assert loaded.model.generation_config.repetition_penalty == 1.5  # really loaded
    return path, loaded


def _greedy(model, ids: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """Oracle: full forwards and argmax, no cache and no ``generate``."""
    sequence, new = list(ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([sequence])).logits[0, -1].argmax())
            new.append(token)
            sequence.append(token)
            if token in stops:
                break
    return new


def _repeats_a_bigram(tokens: list[int]) -> bool:
    bigrams = list(zip(tokens, tokens[1:], strict=False))
    return len(set(bigrams)) < len(bigrams)


def _oracle(loaded, prompts) -> list[list[int]]:
    stops = set(stop_token_ids(loaded.model, loaded.tokenizer))
    return [_greedy(loaded.model, ids, NEW, stops) for ids in prompts]


def test_plain_is_greedy_whatever_the_checkpoint_says(opinionated):
    _, loaded = opinionated
    prompts = chat_ids(loaded.tokenizer, TEXTS)
    expected = _oracle(loaded, prompts)
    assert any(_repeats_a_bigram(row) for row in expected)  # penalties would change these
    for seed in (0, 1):  # a leaked do_sample would differ between seeds
        torch.manual_seed(seed)
        got = generate_ids(loaded.model, loaded.tokenizer, prompts, max_new_tokens=NEW)
        assert [g.token_ids for g in got] == expected


def test_model_defaults_apply_the_checkpoint(opinionated):
    _, loaded = opinionated
    prompts = chat_ids(loaded.tokenizer, TEXTS)
    expected = _oracle(loaded, prompts)
    got = generate_ids(loaded.model, loaded.tokenizer, prompts, max_new_tokens=NEW,
                       do_sample=False, generation_defaults="model")
    rows = [g.token_ids for g in got]
    assert rows != expected
    for ids, row in zip(prompts, rows, strict=True):  # no_repeat_ngram_size=2 held
        assert not _repeats_a_bigram(ids + row)
    assert loaded.model.generation_config.repetition_penalty == 1.5  # restored after the call


def test_effective_settings_describe_what_is_used(opinionated):
    _, loaded = opinionated
    model, tokenizer = loaded.model, loaded.tokenizer
    stops = stop_token_ids(model, tokenizer)
    plain = effective_generation_settings(model, tokenizer, max_new_tokens=7)
    assert plain == {"generation_defaults": "plain", "max_new_tokens": 7, "do_sample": False,
                     "pad_token_id": tokenizer.pad_token_id, "eos_token_id": stops}
    sampled = effective_generation_settings(model, tokenizer, max_new_tokens=7, do_sample=True,
                                            temperature=0.8, top_p=0.9)
    assert {k: sampled[k] for k in ("do_sample", "temperature", "top_p", "top_k")} == {
        "do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 0}
    assert "repetition_penalty" not in sampled and "min_p" not in sampled
    shipped = effective_generation_settings(model, tokenizer, max_new_tokens=7,
                                            generation_defaults="model")
    assert {k: shipped[k] for k in SHIPPED} == SHIPPED  # not asked: the checkpoint's
    assert shipped["max_new_tokens"] == 7 and "max_length" not in shipped
    asked = effective_generation_settings(model, tokenizer, max_new_tokens=7, do_sample=False,
                                          generation_defaults="model")
    assert asked["do_sample"] is False and asked["repetition_penalty"] == 1.5
    json.dumps([plain, sampled, shipped, asked])  # provenance-ready
    with pytest.raises(UsageError, match="generation_defaults"):
        effective_generation_settings(model, tokenizer, max_new_tokens=7,
                                      generation_defaults="checkpoint")


@pytest.mark.parametrize("mode", ["plain", "model"])
def test_generate_runs_with_the_described_config(opinionated, monkeypatch, mode):
    """What ``generate`` receives, and the model's own config while it runs (from which
    transformers fills unset fields), are both exactly the reported settings."""
    _, loaded = opinionated
    model, tokenizer = loaded.model, loaded.tokenizer
    seen = []
    real = model.generate

    def spy(*args, generation_config, **kwargs):
        seen.append((generation_config.to_dict(), model.generation_config.to_dict()))
        return real(*args, generation_config=generation_config, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate_ids(model, tokenizer, chat_ids(tokenizer, TEXTS[:1]), max_new_tokens=3,
                 generation_defaults=mode)
    reported = effective_generation_settings(model, tokenizer, max_new_tokens=3,
                                             generation_defaults=mode)
    passed, own = seen[0]
    for config in (passed, own):
        set_fields = {k: v for k, v in config.items()
                      if v is not None and k not in ("transformers_version", "_from_model_config")}
        assert {"generation_defaults": mode, **set_fields} == reported


def test_noising_sweep_at_scale_zero_is_plain_greedy(opinionated, tmp_path):
    path, loaded = opinionated
    cfg = NoisingConfig(model_name=str(path), dtype="fp32", device="cpu", num_prompts=3,
                        max_prompt_len=64, batch_size=4, max_new_tokens=NEW, layer_index=1,
                        noise_norms=[0.0], num_noise_vectors=1, seed=3,
                        output_dir=str(tmp_path / "out"))
    run = RunDir(run_generate(cfg, loaded=loaded))
    records = [json.loads(line) for file in run.gens_files()
               for line in file.read_text().splitlines()]
    assert len(records) == 3
    expected = _oracle(loaded, [r["prompt_token_ids"] for r in records])
    assert any(_repeats_a_bigram(row) for row in expected)
    assert [r["response_token_ids"] for r in records] == expected
