"""Batched left-padded generation against plain model.generate and per-prompt runs."""

from __future__ import annotations

import pytest
import torch

from conftest import chat_ids
from residlab.generation import generate_ids, stop_token_ids
from residlab.hooks import Add

TEXTS = ["Explain how tides work.", "Write a short poem about autumn leaves falling softly now.",
         "hi", "How do I bake bread at home?"]


def _plain_generate(loaded, ids: list[int], max_new_tokens: int) -> list[int]:
    """Oracle: one unpadded prompt through model.generate with no hooks at all."""
    tokenizer = loaded.tokenizer
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=stop_token_ids(loaded.model, tokenizer))
    new = out[0, len(ids):].tolist()
    stops = set(stop_token_ids(loaded.model, tokenizer))
    for i, token in enumerate(new):
        if token in stops:
            return new[: i + 1]
    return new


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_zero_vector_matches_plain_generate(request, fixture):
    loaded = request.getfixturevalue(fixture)
    prompts = chat_ids(loaded.tokenizer, TEXTS)
    zero = torch.zeros(len(prompts), 64)
    got = generate_ids(loaded.model, loaded.tokenizer, prompts, max_new_tokens=12,
                       interventions=[Add(1, zero)])
    for ids, generated in zip(prompts, got, strict=True):
        assert generated.token_ids == _plain_generate(loaded, ids, 12)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2", "tiny_gemma2"])
def test_batched_equals_per_prompt_with_noise(request, fixture):
    loaded = request.getfixturevalue(fixture)
    prompts = chat_ids(loaded.tokenizer, TEXTS)
    torch.manual_seed(1)
    vectors = torch.randn(len(prompts), 64) * 2
    batched = generate_ids(loaded.model, loaded.tokenizer, prompts, max_new_tokens=10,
                           interventions=[Add(1, vectors)])
    for row, ids in enumerate(prompts):
        single = generate_ids(loaded.model, loaded.tokenizer, [ids], max_new_tokens=10,
                              interventions=[Add(1, vectors[row])])
        assert batched[row] == single[0]


def test_finish_reason_and_stop_token_kept(tiny_llama):
    """A row that emits the end-of-turn token keeps it and says 'stop'."""
    loaded = tiny_llama
    eos = loaded.tokenizer.eos_token_id
    prompts = chat_ids(loaded.tokenizer, TEXTS[:2])
    # Push the residual so hard towards the eos embedding that the model must emit it.
    direction = loaded.model.get_output_embeddings().weight[eos].detach()
    out = generate_ids(loaded.model, loaded.tokenizer, prompts, max_new_tokens=6,
                       interventions=[Add(3, direction * 1e3, site="resid_post")])
    assert all(g.finish_reason == "stop" and g.token_ids[-1] == eos for g in out)
    free = generate_ids(loaded.model, loaded.tokenizer, prompts, max_new_tokens=3)
    for generated in free:
        assert len(generated.token_ids) <= 3
        assert (generated.finish_reason == "stop") == (eos in generated.token_ids)


def test_sampling_is_seeded(tiny_llama):
    prompts = chat_ids(tiny_llama.tokenizer, TEXTS)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(generate_ids(tiny_llama.model, tiny_llama.tokenizer, prompts,
                                 max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2", "tiny_gemma2"])
def test_padded_prefill_equals_single_rows(request, fixture):
    """Left padding with counted position ids: each row's logits as if it were alone."""
    from residlab.generation import padded_inputs

    loaded = request.getfixturevalue(fixture)
    prompts = chat_ids(loaded.tokenizer, TEXTS)
    inputs = padded_inputs(prompts, loaded.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        batched = loaded.model(**inputs).logits
        for row, ids in enumerate(prompts):
            alone = loaded.model(torch.tensor([ids])).logits[0]
            torch.testing.assert_close(batched[row, -len(ids):], alone, atol=1e-5, rtol=1e-4)
