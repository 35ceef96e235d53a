"""Logit lens and attention patterns against independent oracles.

Lens oracle: ``softmax(model(ids).logits)`` for the last layer, and the model's own final norm +
LM head (+ soft-cap) applied to ``output_hidden_states`` for earlier layers and the embedding,
ranked with numpy. Attention oracle: ``output_attentions`` of the same weights loaded with
``attn_implementation="eager"``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from residlab.errors import NotFound, UsageError
from residlab.experiments import load_experiment
from residlab.inference import attention_patterns, logit_lens
from residlab.inference.attention import eager_attention, layer_groups, patterns_of_prompt
from residlab.inference.extract_viz import extract_viz, viz_dir
from residlab.inference.lens import Lens, lens_batch

FIXTURES = ["tiny_llama", "tiny_gpt2", "tiny_gemma2"]
SET = "viz"


def _ids(n: int, seed: int = 0, vocab: int = 290) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=generator).tolist()


def _oracle_logits(lm, ids: list[int]) -> list[torch.Tensor]:
    """Per hidden state (embedding, blocks 0..L-2) the final norm + LM head + soft-cap; the last
    row is the model's own logits. Each ``(T, V)`` float64."""
    with torch.inference_mode():
        out = lm(input_ids=torch.tensor([ids]), output_hidden_states=True)
        body = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.transformer
        norm = getattr(body, "norm", None) or getattr(body, "ln_f", None)
        cap = getattr(lm.config, "final_logit_softcapping", None)
        rows = []
        for hidden in out.hidden_states[:-1]:  # hidden_states[-1] is already final-normed
            logits = lm.lm_head(norm(hidden))[0]
            rows.append(torch.tanh(logits / cap) * cap if cap else logits)
        rows.append(out.logits[0])
    return [row.double() for row in rows]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_lens_equals_the_models_softmax_at_every_layer(fixture, request):
    loaded = request.getfixturevalue(fixture)
    ids = _ids(23)
    readout = logit_lens(loaded, ids, top_k=7)
    n_layers = len(readout.layers) - 1
    assert readout.layers == ["embed", *range(n_layers)]
    for row, logits in enumerate(_oracle_logits(loaded.model, ids)):
        probs = torch.softmax(logits[:-1], dim=-1).numpy()  # (T-1, V)
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :7]
        expected = np.take_along_axis(probs, order, axis=-1)
        np.testing.assert_allclose(readout.top_probs[row].numpy(), expected, atol=1e-5)
        # equal ids, except where two probabilities tie within rounding
        same = readout.top_ids[row].numpy() == order
        assert same.all() or np.allclose(np.diff(expected, axis=-1)[~same[:, 1:]], 0, atol=1e-6)
        actual = np.array(ids[1:])
        own = probs[np.arange(len(actual)), actual]
        np.testing.assert_allclose(readout.actual_prob[row].numpy(), own, atol=1e-5)
        ranks = (probs > own[:, None] + 1e-9).sum(axis=-1) + 1
        assert (np.abs(readout.actual_rank[row].numpy() - ranks) <= 1).all()
        assert (readout.actual_rank[row].numpy() == ranks).mean() > 0.95
    assert torch.equal(readout.actual_ids, torch.tensor(ids[1:]))


def test_lens_of_a_batch_equals_each_prompt_alone(tiny_llama):
    rows = [_ids(9, 1), _ids(17, 2), _ids(4, 3)]
    lens = Lens(tiny_llama.model)
    together = lens_batch(tiny_llama.model, lens, rows, [1, 3], top_k=5,
                          pad_id=tiny_llama.tokenizer.pad_token_id)
    for ids, batched in zip(rows, together, strict=True):
        alone = logit_lens(tiny_llama, ids, layers=[1, 3], top_k=5)
        assert batched.layers == alone.layers == ["embed", 1, 3]
        torch.testing.assert_close(batched.top_probs, alone.top_probs, atol=1e-5, rtol=1e-4)
        assert torch.equal(batched.actual_rank, alone.actual_rank)


def test_lens_casts_a_bf16_model_to_float32(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    readout = logit_lens(lm, _ids(12), top_k=3)
    assert readout.top_probs.dtype == torch.float32
    assert torch.isfinite(readout.top_probs).all()
    torch.testing.assert_close(readout.top_probs.sum(-1), readout.top_probs.sum(-1))
    assert lm.model.norm.weight.dtype == torch.bfloat16  # the model is untouched


def _eager(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.mark.parametrize("fixture", FIXTURES)
def test_attention_equals_eager_output_attentions_per_head(fixture, request):
    loaded = request.getfixturevalue(fixture)
    ids = _ids(21)
    before = loaded.model.config._attn_implementation
    weights = attention_patterns(loaded, ids)  # (L, H, T, T)
    assert loaded.model.config._attn_implementation == before  # switched back
    with torch.inference_mode():
        expected = _eager(request.getfixturevalue(f"{fixture}_dir"))(
            input_ids=torch.tensor([ids]), output_attentions=True).attentions
    heads = loaded.model.config.num_attention_heads
    assert weights.shape == (len(expected), heads, len(ids), len(ids))
    for layer, oracle in enumerate(expected):
        torch.testing.assert_close(weights[layer], oracle[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5, rtol=0)
    assert torch.triu(weights, diagonal=1).abs().max() == 0
    for layer in range(weights.shape[0]):  # real heads, not one row copied
        assert all((weights[layer, h] - weights[layer, 0]).abs().max() > 1e-3
                   for h in range(1, heads))


def test_layer_groups_bound_memory_and_give_the_same_weights(tiny_llama):
    ids = _ids(30)
    assert layer_groups([0, 1, 2, 3], heads=4, tokens=30, budget=2 * 4 * 30 * 30 * 4) == [
        [0, 1], [2, 3]]
    arch = Lens(tiny_llama.model).arch
    with eager_attention(tiny_llama.model):
        grouped = patterns_of_prompt(tiny_llama.model, arch, ids, [0, 1, 2, 3], budget=1)
        whole = patterns_of_prompt(tiny_llama.model, arch, ids, [0, 1, 2, 3])
    assert torch.equal(grouped, whole)


def test_attention_is_switched_back_also_on_error(tiny_llama):
    before = tiny_llama.model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), eager_attention(tiny_llama.model):
        assert tiny_llama.model.config._attn_implementation == "eager"
        raise RuntimeError("boom")
    assert tiny_llama.model.config._attn_implementation == before


def test_a_model_that_cannot_switch_is_named(tiny_llama, monkeypatch):
    if tiny_llama.model.config._attn_implementation == "eager":
        pytest.skip("already eager")
    monkeypatch.setattr(type(tiny_llama.model), "_can_set_attn_implementation",
                        lambda self: False)
    with pytest.raises(UsageError, match="LlamaForCausalLM runs .* cannot be switched"):
        attention_patterns(tiny_llama, _ids(5))


def test_sdpa_weights_are_refused_not_recorded_as_nothing(tiny_llama):
    from residlab.hooks import AttentionPattern, intervene

    if tiny_llama.model.config._attn_implementation != "sdpa":
        pytest.skip("not sdpa")
    attention = tiny_llama.model.model.layers[1].self_attn
    hooks = dict(attention._forward_hooks)  # transformers keeps its own
    with pytest.raises(UsageError, match="returned no attention weights"), \
            intervene(tiny_llama.model, [AttentionPattern(1)]):
        tiny_llama.model(input_ids=torch.tensor([_ids(5)]))
    assert dict(attention._forward_hooks) == hooks


# --- the command over a prompt set ------------------------------------------------------------

@pytest.fixture
def experiment(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    config = {"model_variants": {"base": {"model": str(tiny_llama_dir), "dtype": "fp32",
                                          "device": "cpu"}},
              "defaults": {"application": "base"}}
    (tmp_path / "experiments" / "exp").mkdir(parents=True)
    (tmp_path / "experiments" / "exp" / "config.yaml").write_text(yaml.safe_dump(config))
    experiment = load_experiment("exp")
    folder = experiment.responses_dir("base", SET)
    folder.mkdir(parents=True)
    for index, length in enumerate([11, 19, 7]):
        (folder / f"{index}.json").write_text(json.dumps(
            {"token_ids": _ids(length, index), "prompt_end": length // 2}))
    return experiment


def test_a_layer_request_stores_exactly_those_layers(experiment, tiny_llama):
    result = extract_viz(experiment, SET, attention=True, logit_lens=True, layers="1,3",
                         top_k=4, loaded=tiny_llama, json_attention=True)
    folder = viz_dir(experiment, "base", SET)
    assert result.out_dir == folder and len(result.written) == 6
    ids = json.loads((experiment.responses_dir("base", SET) / "1.json").read_text())["token_ids"]
    lens = json.loads((folder / "1_logit_lens.json").read_text())
    assert lens["layers"] == ["embed", 1, 3] and lens["n_layers"] == 4 and lens["top_k"] == 4
    assert lens["token_ids"] == ids and lens["n_prompt_tokens"] == 9
    assert lens["n_response_tokens"] == 10 and len(lens["predictions"]) == 18
    step = lens["predictions"][5]
    assert step["token_idx"] == 5 and step["actual_next_token_id"] == ids[6]
    assert [entry["layer"] for entry in step["by_layer"]] == ["embed", 1, 3]
    oracle = logit_lens(tiny_llama, ids, layers=[1, 3], top_k=4)
    last = step["by_layer"][2]
    assert [e["token_id"] for e in last["top_k"]] == oracle.top_ids[2, 5].tolist()
    assert last["actual_rank"] == oracle.actual_rank[2, 5].item()
    assert last["top_k"][0]["token"] == tiny_llama.tokenizer.decode([oracle.top_ids[2, 5, 0]])
    with safe_open(str(folder / "1_attention.safetensors"), framework="pt") as handle:
        stored = handle.get_tensor("attention")
        meta = handle.metadata()
    assert stored.dtype == torch.float16 and stored.shape == (2, 4, 19, 19)
    assert json.loads(meta["layers"]) == [1, 3] and json.loads(meta["token_ids"]) == ids
    assert meta["prompt_end"] == "9" and len(json.loads(meta["tokens"])) == 19
    expected = attention_patterns(tiny_llama, ids, layers=[1, 3])
    torch.testing.assert_close(stored.float(), expected, atol=1e-3, rtol=0)
    seed_shape = json.loads((folder / "1_attention.json").read_text())
    assert seed_shape["n_heads"] == 4 and seed_shape["layers"] == [1, 3]
    row = seed_shape["attention"][6]
    assert row["token_idx"] == 6 and row["context_size"] == 7
    assert np.allclose(row["by_layer"], stored[:, :, 6, :7].float().numpy())


def test_skip_existing_keeps_matching_files_and_redoes_others(experiment, tiny_llama, caplog):
    extract_viz(experiment, SET, logit_lens=True, top_k=3, loaded=tiny_llama)
    again = extract_viz(experiment, SET, logit_lens=True, top_k=3, loaded=tiny_llama,
                        skip_existing=True)
    assert again.written == [] and again.skipped == 3
    with caplog.at_level("INFO", logger="residlab.inference.extract_viz"):
        other = extract_viz(experiment, SET, logit_lens=True, top_k=5, loaded=tiny_llama,
                            skip_existing=True)
    assert len(other.written) == 3 and "other settings" in caplog.text


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"logit_lens": True, "layers": "9"}, "layer 9 is out of range"),
    ({}, "give --attention, --logit-lens or both"),
    ({"logit_lens": True, "top_k": 0}, "--top-k 0"),
])
def test_bad_requests_are_one_line_and_write_nothing(experiment, tiny_llama, kwargs, message):
    with pytest.raises(UsageError, match=message) as error:
        extract_viz(experiment, SET, loaded=tiny_llama, **kwargs)
    assert "\n" not in str(error.value)
    assert not viz_dir(experiment, "base", SET).exists()


def test_no_responses_says_which_command_makes_them(experiment, tiny_llama):
    with pytest.raises(NotFound, match="run 'residlab responses"):
        extract_viz(experiment, "absent", logit_lens=True, loaded=tiny_llama)


def test_a_response_whose_ids_disagree_is_refused_before_any_write(experiment, tiny_llama):
    folder = experiment.responses_dir("base", SET)
    (folder / "2.json").write_text(json.dumps({"token_ids": [5, 6, 7], "prompt_end": 9}))
    with pytest.raises(UsageError, match="2.json: needs 'token_ids'"):
        extract_viz(experiment, SET, logit_lens=True, loaded=tiny_llama)
    (folder / "2.json").write_text(json.dumps({"token_ids": [5, 6, 7], "prompt_end": 1,
                                               "tokens": ["a", "b"]}))
    with pytest.raises(UsageError, match="'tokens' has 2 entries"):
        extract_viz(experiment, SET, logit_lens=True, loaded=tiny_llama)
    (folder / "2.json").write_text(json.dumps({"token_ids": [5, 99999], "prompt_end": 1}))
    with pytest.raises(UsageError, match="outside this model's vocabulary"):
        extract_viz(experiment, SET, logit_lens=True, loaded=tiny_llama)
    assert not list(viz_dir(experiment, "base", SET).glob("*"))


def test_a_family_without_a_known_attention_module_is_named(experiment, tiny_llama,
                                                            monkeypatch):
    from residlab.inference import extract_viz as module

    real = module.resolve_arch
    monkeypatch.setattr(module, "resolve_arch",
                        lambda model: real(model, layers_path="model.layers"))
    with pytest.raises(UsageError, match="cannot find the attention module"):
        extract_viz(experiment, SET, attention=True, loaded=tiny_llama)
