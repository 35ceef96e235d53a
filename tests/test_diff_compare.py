"""Model diff, compare: diff vectors, cosines and effect sizes against numpy on the raw
captures of two tiny Llamas (different seeds) captured on the same tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import _token_ids, chat_ids
from residlab.analysis.model_diff.compare import compare_variants, layer_stats, results_dir
from residlab.analysis.model_diff.pairs import paired_captures
from residlab.errors import NotFound, UsageError
from residlab.experiments import load_experiment
from residlab.inference.capture import capture_prompt_set
from residlab.inference.raw import load_raw, save_raw
from residlab.traits.vectors import TraitVector, save_vector

SET = "pairs"
CHEER, ATTN = "test/cheer", "test/attn"
PROMPTS = [("How do tides work?", "Two a day, because of the moon."),
           ("Bake bread?", "Flour, water, salt and yeast."),
           ("A poem please", "Autumn leaves falling softly, the quick brown fox."),
           ("Capital of France?", "Paris, bien sur."),
           ("Add numbers", "def add(a, b): return a + b")]


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A second tiny Llama of the same shape with other weights (seed 1)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, **_token_ids(tiny_tokenizer))
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("models") / "tiny-llama-b"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _vector(experiment, trait, component, method, layer, effect, seed):
    generator = torch.Generator().manual_seed(seed)
    save_vector(experiment, TraitVector(trait, "a", "response[:5]", component, method, layer,
                                        torch.randn(64, generator=generator),
                                        {"effect_size": effect}))


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_llama_dir, other_llama_dir, tiny_tokenizer) -> Path:
    """Experiment "exp": B answered, A captured on B's responses; vectors of two traits."""
    root = tmp_path_factory.mktemp("experiments")
    cpu = {"dtype": "fp32", "device": "cpu"}
    (root / "exp").mkdir()
    (root / "exp" / "config.yaml").write_text(yaml.safe_dump({"model_variants": {
        "a": {"model": str(tiny_llama_dir), **cpu}, "b": {"model": str(other_llama_dir), **cpu}},
        "defaults": {"application": "a", "extraction": "a"}}))
    experiment = load_experiment("exp", root)
    folder = experiment.responses_dir("b", SET)
    folder.mkdir(parents=True)
    prompt_ids = chat_ids(tiny_tokenizer, [p for p, _ in PROMPTS])
    for i, ((prompt, response), ids) in enumerate(zip(PROMPTS, prompt_ids, strict=True)):
        answer = tiny_tokenizer.encode(response, add_special_tokens=False)
        (folder / f"{i}.json").write_text(json.dumps({
            "prompt": prompt, "response": response, "token_ids": ids + answer,
            "prompt_end": len(ids)}))
    capture_prompt_set(experiment, SET, variant="b", dtype="fp32")
    capture_prompt_set(experiment, SET, variant="a", responses_from="b", dtype="fp32")
    for layer in (0, 1, 3):  # no mean_diff vector at layer 2
        _vector(experiment, CHEER, "residual", "mean_diff", layer, 2.0 + layer, layer)
    for layer in range(4):
        _vector(experiment, CHEER, "residual", "probe", layer, 1.0, 10 + layer)
        _vector(experiment, ATTN, "attn_contribution", "mean_diff", layer, 1.0, 20 + layer)
    return root


@pytest.fixture
def experiment(root, tmp_path):
    """A private copy (tests may damage its captures)."""
    shutil.copytree(root, tmp_path / "experiments")
    return load_experiment("exp", tmp_path / "experiments")


# --- numpy oracle ---------------------------------------------------------------------------

def _means(experiment, variant, layer, component) -> np.ndarray:
    """(n, d): each prompt's mean over response tokens, from load_raw."""
    files = sorted(experiment.raw_dir(variant, SET).glob("*.safetensors"))
    return np.stack([load_raw(f)["response"]["activations"][layer][component].numpy()
                     .astype(np.float64).mean(0) for f in files])


def _stored(experiment, trait, component, method, layer) -> np.ndarray:
    path = (experiment.path / "extraction" / trait / "a" / "vectors" / "response__5"
            / component / method / f"layer{layer}.safetensors")
    with safe_open(str(path), framework="np") as handle:
        return handle.get_tensor("vector").astype(np.float64)


def _oracle(experiment, trait, component, method, layer, vectors=None) -> dict:
    a, b = (_means(experiment, v, layer, component) for v in ("a", "b"))
    v = _stored(vectors or experiment, trait, component, method, layer)
    unit = v / np.linalg.norm(v)
    pa, pb = a @ unit, b @ unit
    diff = (b - a).mean(0)
    return {"diff": diff, "cosine_sim": diff @ v / np.linalg.norm(diff) / np.linalg.norm(v),
            "effect_size": (pb.mean() - pa.mean()) / np.sqrt((np.var(pb, ddof=1)
                                                              + np.var(pa, ddof=1)) / 2),
            "paired_effect_size": (pb - pa).mean() / np.std(pb - pa),
            "std_a": np.std(pa), "std_b": np.std(pb), "mean_a": pa.mean(), "mean_b": pb.mean()}


STATS = ("cosine_sim", "effect_size", "paired_effect_size", "std_a", "std_b", "mean_a",
         "mean_b")


def test_compare_matches_numpy_and_lists_stay_aligned(experiment):
    path = compare_variants(experiment, "a", "b", SET)
    assert path == results_dir(experiment, "a", "b", SET) / "results.json"
    results = json.loads(path.read_text())
    assert (results["n_prompts"], results["component"]) == (len(PROMPTS), "residual")
    cheer = results["traits"][CHEER]
    assert (cheer["method"], cheer["position"], cheer["layers"]) == (
        "mean_diff", "response[:5]", [0, 1, 2, 3])
    for name in STATS:
        values = cheer[f"per_layer_{name}"]
        assert len(values) == 4 and values[2] is None  # layer 2 has no vector: null in place
        for i, layer in enumerate((0, 1, 3)):
            want = _oracle(experiment, CHEER, "residual", "mean_diff", layer)[name]
            assert values[[0, 1, 3][i]] == pytest.approx(want, rel=1e-5, abs=1e-9), name
    ds = [cheer["per_layer_effect_size"][i] for i in (0, 1, 3)]
    peak = [0, 1, 3][int(np.argmax(np.abs(ds)))]
    assert cheer["peak_layer"] == peak
    assert cheer["peak_effect_size"] == cheer["per_layer_effect_size"][peak]
    assert cheer["peak_paired_effect_size"] == cheer["per_layer_paired_effect_size"][peak]
    # the attention-only trait is compared on attn_contribution activations
    attn = results["traits"][ATTN]
    assert attn["component"] == "attn_contribution" and None not in attn["per_layer_cosine_sim"]
    want = _oracle(experiment, ATTN, "attn_contribution", "mean_diff", 2)
    assert attn["per_layer_paired_effect_size"][2] == pytest.approx(
        want["paired_effect_size"], rel=1e-5)
    with safe_open(str(path.parent / "diff_vectors.safetensors"), framework="np") as handle:
        meta = json.loads(handle.metadata()["residlab"])
        assert (meta["layers"], meta["n_prompts"], meta["variants"]) == ([0, 1, 2, 3], 5,
                                                                          ["a", "b"])
        for layer in range(4):
            want = _oracle(experiment, CHEER, "residual", "probe", layer)["diff"]
            np.testing.assert_allclose(handle.get_tensor(f"layer{layer}"), want, rtol=1e-5,
                                       atol=1e-6)
        want = _oracle(experiment, ATTN, "attn_contribution", "mean_diff", 1)["diff"]
        np.testing.assert_allclose(handle.get_tensor("attn_contribution.layer1"), want,
                                   rtol=1e-5, atol=1e-6)


def test_explicit_method_and_position_and_merge(experiment):
    compare_variants(experiment, "a", "b", SET, traits=[ATTN])
    path = compare_variants(experiment, "a", "b", SET, traits=[CHEER], method="probe",
                            position="response[:5]")
    results = json.loads(path.read_text())
    cheer = results["traits"][CHEER]
    assert cheer["method"] == "probe" and None not in cheer["per_layer_effect_size"]
    want = _oracle(experiment, CHEER, "residual", "probe", 2)
    assert cheer["per_layer_cosine_sim"][2] == pytest.approx(want["cosine_sim"], rel=1e-5)
    assert ATTN in results["traits"]  # the earlier run's trait is kept (same basis)


def test_requested_layer_without_vector_names_the_layers_that_exist(experiment):
    with pytest.raises(NotFound, match=r"layer\(s\) \[2\]; it has layers \[0, 1, 3\]"):
        compare_variants(experiment, "a", "b", SET, traits=[CHEER], method="mean_diff",
                         position="response[:5]", layers=[2])
    path = compare_variants(experiment, "a", "b", SET, traits=[CHEER], layers=[-1])
    assert json.loads(path.read_text())["traits"][CHEER]["layers"] == [3]


def test_vectors_from_another_experiment(experiment):
    other = experiment.path.parent / "vex"
    other.mkdir()
    (other / "config.yaml").write_text(yaml.safe_dump(
        {"model_variants": {"a": {"model": "default"}}, "defaults": {"extraction": "a"}}))
    shutil.move(experiment.path / "extraction", other / "extraction")
    results = json.loads(compare_variants(experiment, "a", "b", SET, traits=[CHEER],
                                          vector_experiment="vex").read_text())
    want = _oracle(experiment, CHEER, "residual", "mean_diff", 0,
                   vectors=load_experiment("vex", experiment.path.parent))
    assert results["traits"][CHEER]["per_layer_effect_size"][0] == pytest.approx(
        want["effect_size"], rel=1e-5)
    assert results["vector_experiment"] == "vex"


def test_layer_stats_by_hand():
    stats = layer_stats(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]))
    assert stats["effect_size"] == pytest.approx(2 / np.sqrt(2.5))  # sds 1 and 2
    assert stats["paired_effect_size"] == pytest.approx(2 / np.sqrt(2 / 3))
    assert (stats["std_a"], stats["std_b"]) == pytest.approx((np.sqrt(2 / 3),
                                                              np.sqrt(8 / 3)))
    same = layer_stats(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    assert same["paired_effect_size"] is None and same["effect_size"] == 0.0


# --- bad input ------------------------------------------------------------------------------

def _rewrite(path: Path, drop_layer: int | None = None, **meta_changes) -> None:
    """Re-save a capture without one layer's tensors and/or with changed metadata."""
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["residlab"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    tensors = {k: v for k, v in tensors.items() if f".layer{drop_layer}." not in k}
    save_raw(path, tensors, {**meta, **meta_changes})


def test_bad_inputs(experiment):
    with pytest.raises(NotFound, match="no model variant 'c'"):
        compare_variants(experiment, "a", "c", SET)
    with pytest.raises(NotFound, match="residlab capture .*--model-variant a --responses-from b"):
        compare_variants(experiment, "a", "b", "other_set")
    files = sorted(experiment.raw_dir("a", SET).glob("*.safetensors"))
    sha = load_raw(files[1])["metadata"]["token_ids_sha256"]
    _rewrite(files[1], token_ids_sha256="0" * 64)
    with pytest.raises(UsageError, match="prompt 1: .*different token ids.*--responses-from"):
        compare_variants(experiment, "a", "b", SET)
    _rewrite(files[1], token_ids_sha256=sha)
    assert len(paired_captures(experiment, "a", "b", SET)) == len(PROMPTS)
    for path in files:
        _rewrite(path, drop_layer=3)
    with pytest.raises(UsageError, match=r"layer\(s\) \[3\] captured for variant b only"):
        compare_variants(experiment, "a", "b", SET)
    for path in files:
        path.rename(path.with_name(f"x{path.name}"))
    with pytest.raises(UsageError, match="share no captured prompt ids"):
        compare_variants(experiment, "a", "b", SET)


def _edit_meta(path: Path, edit) -> None:
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["residlab"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    edit(meta)
    save_raw(path, tensors, meta)


def test_token_check_falls_back_to_id_lists(experiment):
    """Captures that record no token hash (response ids only) are compared by their ids."""
    path = experiment.raw_dir("a", SET) / "2.safetensors"

    def no_hash(meta):
        del meta["token_ids_sha256"], meta["parts"]["prompt"]

    _edit_meta(path, no_hash)
    assert paired_captures(experiment, "a", "b", SET)[2].held_a.token_sha is None

    def other_ids(meta):
        meta["parts"]["response"]["token_ids"][0] += 1

    _edit_meta(path, other_ids)
    with pytest.raises(UsageError, match="prompt 2: .*different token ids"):
        paired_captures(experiment, "a", "b", SET)


def test_command_line(experiment, monkeypatch, capsys):
    from residlab.cli import main

    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(experiment.path.parent))
    common = ["diff", "compare", "--experiment", "exp", "--variant-a", "a", "--prompt-set", SET]
    assert main([*common, "--variant-b", "c"]) == 2
    assert "no model variant 'c'" in capsys.readouterr().err
    assert main([*common, "--variant-b", "b", "--traits", CHEER]) == 0
    results = json.loads((results_dir(experiment, "a", "b", SET) / "results.json").read_text())
    assert list(results["traits"]) == [CHEER]
