"""The vector logit lens against numpy ``W_U @ v`` on tiny models: tied heads, padded
vocabularies, common-token filtering, LoRA-wrapped models and bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from residlab.errors import NotFound, UsageError
from residlab.experiments import load_experiment
from residlab.inference.vector_lens import lens_path, vector_logit_lens
from residlab.models import LoadedModel
from residlab.traits.vectors import TraitVector, save_vector

TRAIT = "test/cheer"


@pytest.fixture
def experiment(tmp_path, monkeypatch, tiny_llama_dir, tiny_gpt2_dir):
    """Variants ``app`` (GPT-2, listed first) and ``ext`` (Llama, the extraction default)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    cpu = {"dtype": "fp32", "device": "cpu"}
    config = {"model_variants": {"app": {"model": str(tiny_gpt2_dir), **cpu},
                                 "ext": {"model": str(tiny_llama_dir), **cpu}},
              "defaults": {"application": "app", "extraction": "ext"}}
    (tmp_path / "experiments" / "t").mkdir(parents=True)
    (tmp_path / "experiments" / "t" / "config.yaml").write_text(yaml.safe_dump(config))
    return load_experiment("t")


def _store(experiment, vector, *, trait=TRAIT, variant="ext", method="mean_diff", layer=0,
           position="response[:5]", component="residual"):
    save_vector(experiment, TraitVector(trait, variant, position, component, method, layer,
                                        torch.as_tensor(vector, dtype=torch.float32),
                                        {"effect_size": 1.0}))


def _random_vectors(experiment, d=64, seed=0, **where):
    """Four vectors: two methods x two layers, plus one at another position and component."""
    rng = np.random.default_rng(seed)
    settings = [("mean_diff", 0, "response[:5]", "residual"), ("mean_diff", 2, "response[:5]",
                                                                "residual"),
                ("probe", 1, "response[:5]", "residual"),
                ("mean_diff", 1, "prompt[-1]", "attn_contribution")]
    stored = {}
    for method, layer, position, component in settings:
        vector = rng.standard_normal(d) * 3
        _store(experiment, vector, method=method, layer=layer, position=position,
               component=component, **where)
        stored[(method, layer, position, component)] = vector
    return stored


def _oracle(weight: np.ndarray, vector: np.ndarray, k: int):
    """Float64 logits of the unit vector, the k largest ids and the k smallest ids."""
    logits = weight.astype(np.float64) @ (vector / np.linalg.norm(vector))
    return logits, np.argsort(-logits, kind="stable")[:k], np.argsort(logits, kind="stable")[:k]


def _records(path):
    data = json.loads(path.read_text())
    return data, {(r["method"], r["layer"], r["position"], r["component"]): r
                  for r in data["vectors"]}


def _check_side(entries, ids, logits, tokenizer):
    assert [e["token_id"] for e in entries] == [int(i) for i in ids]
    np.testing.assert_allclose([e["logit"] for e in entries], logits[ids], atol=1e-5)
    assert [e["token"] for e in entries] == [tokenizer.decode([int(i)]) for i in ids]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_lens_equals_numpy(experiment, request, fixture):
    loaded = request.getfixturevalue(fixture)
    stored = _random_vectors(experiment)
    (path,) = vector_logit_lens(experiment, loaded=loaded, top_k=7)
    assert path == lens_path(experiment, TRAIT, "ext")
    # both heads are tied: the input embedding matrix is W_U, read by another route
    weight = loaded.model.get_input_embeddings().weight.detach().numpy()
    data, records = _records(path)
    assert (data["trait"], data["variant"], data["top_k"]) == (TRAIT, "ext", 7)
    assert list(records) == sorted(stored, key=lambda key: (key[2], key[3], key[0], key[1]))
    for key, vector in stored.items():
        logits, toward, away = _oracle(weight, vector, 7)
        _check_side(records[key]["toward"], toward, logits, loaded.tokenizer)
        _check_side(records[key]["away"], away, logits, loaded.tokenizer)
        assert records[key]["norm"] == pytest.approx(np.linalg.norm(vector), rel=1e-5)


def test_default_variant_and_traits_load_the_extraction_model(experiment, tiny_llama):
    """No variant, traits or model given: every trait with vectors for defaults.extraction,
    read with that variant's model (Llama, not the GPT-2 listed first)."""
    vector = np.random.default_rng(1).standard_normal(64)
    _store(experiment, vector)
    _store(experiment, vector, trait="test/gloom", layer=3)
    _store(experiment, vector, trait="test/other", variant="app")
    written = vector_logit_lens(experiment.name, top_k=3)
    assert written == [lens_path(experiment, t, "ext") for t in (TRAIT, "test/gloom")]
    assert not lens_path(experiment, "test/other", "app").exists()
    data, records = _records(written[1])
    assert "tiny-llama" in data["model"] and data["vocab_size"] == len(tiny_llama.tokenizer)
    weight = tiny_llama.model.get_input_embeddings().weight.detach().numpy()
    logits, toward, _ = _oracle(weight, vector, 3)
    _check_side(records[("mean_diff", 3, "response[:5]", "residual")]["toward"], toward, logits,
                tiny_llama.tokenizer)


def test_filter_common_drops_tokens_that_top_every_vector(experiment, tiny_llama):
    weight = tiny_llama.model.get_input_embeddings().weight.detach().numpy()
    top, bottom, k = 40, 90, 5
    rng = np.random.default_rng(2)
    vectors = {}
    for layer in range(3):  # each vector leans toward token 40 and away from token 90
        vectors[layer] = 4 * (weight[top] - weight[bottom]) + rng.standard_normal(64) * 0.05
        _store(experiment, vectors[layer], layer=layer)
    ranked = {layer: _oracle(weight, v, 2 * k) for layer, v in vectors.items()}
    common_up = set.intersection(*(set(r[1][:k].tolist()) for r in ranked.values()))
    common_down = set.intersection(*(set(r[2][:k].tolist()) for r in ranked.values()))
    assert top in common_up and bottom in common_down  # the setting holds
    (path,) = vector_logit_lens(experiment, loaded=tiny_llama, top_k=k, filter_common=True)
    data, records = _records(path)
    assert {e["token_id"] for e in data["common"]["toward"]} == common_up
    assert {e["token_id"] for e in data["common"]["away"]} == common_down
    for layer, (logits, toward, away) in ranked.items():
        record = records[("mean_diff", layer, "response[:5]", "residual")]
        kept_up = [i for i in toward if i not in common_up][:k]
        kept_down = [i for i in away if i not in common_down][:k]
        assert len(record["toward"]) == len(record["away"]) == k
        _check_side(record["toward"], kept_up, logits, tiny_llama.tokenizer)
        _check_side(record["away"], kept_down, logits, tiny_llama.tokenizer)


def test_filter_common_with_one_vector_changes_nothing(experiment, tiny_llama):
    _store(experiment, np.random.default_rng(3).standard_normal(64))
    (path,) = vector_logit_lens(experiment, loaded=tiny_llama, top_k=4)
    plain = json.loads(path.read_text())["vectors"]
    vector_logit_lens(experiment, loaded=tiny_llama, top_k=4, filter_common=True)
    assert json.loads(path.read_text())["vectors"] == plain


def test_padded_vocabulary_rows_are_never_reported(experiment, tiny_tokenizer):
    """Rows of W_U beyond the tokenizer (padding) are made the largest and smallest logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    n = len(tiny_tokenizer)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=n + 16,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    vector = np.random.default_rng(4).standard_normal(32)
    unit = torch.tensor(vector / np.linalg.norm(vector), dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[n:n + 8] = 100 * unit
        model.lm_head.weight[n + 8:] = -100 * unit
    _store(experiment, vector)
    loaded = LoadedModel(model, tiny_tokenizer, "padded", torch.device("cpu"), torch.float32)
    (path,) = vector_logit_lens(experiment, loaded=loaded, top_k=6)
    _, records = _records(path)
    logits, toward, away = _oracle(model.lm_head.weight[:n].detach().numpy(), vector, 6)
    record = records[("mean_diff", 0, "response[:5]", "residual")]
    _check_side(record["toward"], toward, logits, tiny_tokenizer)
    _check_side(record["away"], away, logits, tiny_tokenizer)


def _lens(experiment, loaded, top_k=6):
    (path,) = vector_logit_lens(experiment, loaded=loaded, top_k=top_k)
    return _records(path)[1]


def _assert_same_lens(a, b):
    assert list(a) == list(b)
    for key in a:
        for side in ("toward", "away"):
            assert [e["token_id"] for e in a[key][side]] == [e["token_id"] for e in b[key][side]]
            np.testing.assert_allclose([e["logit"] for e in a[key][side]],
                                       [e["logit"] for e in b[key][side]], atol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_lora_model_reads_like_its_merged_model(experiment, tiny_tokenizer, targets):
    """A LoRA away from the head leaves the lens as it is; one on the head counts in full."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=len(tiny_tokenizer), tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=targets, init_lora_weights=False)).eval()
    with torch.no_grad():  # a large enough adapter to reorder the head's tokens
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.mul_(20)
    merged = copy.deepcopy(lora).merge_and_unload()
    _random_vectors(experiment)

    def wrap(model):
        return LoadedModel(model, tiny_tokenizer, "m", torch.device("cpu"), torch.float32)

    with_lora, plain = _lens(experiment, wrap(lora)), _lens(experiment, wrap(merged))
    _assert_same_lens(with_lora, plain)
    head_changed = not torch.equal(merged.lm_head.weight, base.lm_head.weight)
    assert head_changed == ("lm_head" in targets)
    if head_changed:  # the adapter's delta moved the ranking: the check above can tell
        before = _lens(experiment, wrap(base))
        with pytest.raises(AssertionError):
            _assert_same_lens(with_lora, before)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line_and_writes_nothing(experiment, tiny_llama, tmp_path):
    _store(experiment, np.ones(64))
    with pytest.raises(UsageError) as error:
        vector_logit_lens(experiment, loaded=tiny_llama, top_k=0)
    assert "top_k" in _one_line(error)
    with pytest.raises(NotFound) as error:
        vector_logit_lens(experiment, traits=[TRAIT, "test/nope"], loaded=tiny_llama)
    assert "unknown trait 'test/nope'" in _one_line(error) and TRAIT in str(error.value)
    _store(experiment, np.ones(64), trait="test/elsewhere", variant="app")
    with pytest.raises(NotFound) as error:
        vector_logit_lens(experiment, traits=["test/elsewhere"], loaded=tiny_llama)
    assert "residlab extract" in _one_line(error) and "--traits test/elsewhere" in str(error.value)
    _store(experiment, np.ones(32), trait="test/narrow", layer=2)
    with pytest.raises(UsageError) as error:
        vector_logit_lens(experiment, loaded=tiny_llama)
    assert "layer2.safetensors" in _one_line(error) and "64" in str(error.value)
    with pytest.raises(UsageError, match="relative name"):
        vector_logit_lens(experiment, traits=["../t"], loaded=tiny_llama)
    assert not list((tmp_path / "experiments").rglob("logit_lens.json"))


def test_no_vectors_at_all(experiment, tiny_llama):
    with pytest.raises(NotFound) as error:
        vector_logit_lens(experiment, loaded=tiny_llama)
    assert "residlab extract" in _one_line(error)


def test_bf16_head_is_read_in_float32_chunk_by_chunk(experiment, tiny_llama, monkeypatch):
    """A bf16 model's lens equals float64 numpy on its (bf16) weights, also when W_U is
    converted a few rows at a time."""
    import residlab.inference.vector_lens as vector_lens

    monkeypatch.setattr(vector_lens, "CHUNK_BYTES", 4 * 64 * 50)  # 50 rows per chunk
    model = copy.deepcopy(tiny_llama.model).to(torch.bfloat16)
    loaded = LoadedModel(model, tiny_llama.tokenizer, "bf16", torch.device("cpu"),
                         torch.bfloat16)
    stored = _random_vectors(experiment)
    records = _lens(experiment, loaded, top_k=8)
    weight = model.lm_head.weight.detach().float().numpy()
    for key, vector in stored.items():
        logits, toward, away = _oracle(weight, vector, 8)
        _check_side(records[key]["toward"], toward, logits, tiny_llama.tokenizer)
        _check_side(records[key]["away"], away, logits, tiny_llama.tokenizer)
