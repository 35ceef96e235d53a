"""Per-token model diff: deltas against the projection files and the raw captures, the clause
split, the aggregate, layer sensitivity and span rankings, each recomputed with numpy."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml

from residlab.analysis.model_diff import diff_dir
from residlab.analysis.model_diff.layers import layer_sensitivity
from residlab.analysis.model_diff.per_token import (
    format_top_clauses,
    per_token_diff,
    split_clauses,
)
from residlab.analysis.model_diff.spans import format_spans, top_spans
from residlab.errors import NotFound, UsageError
from residlab.experiments import load_experiment
from residlab.inference.capture import capture_prompt_set
from residlab.inference.project import project_prompt_set, projection_dir
from residlab.inference.raw import load_raw
from residlab.inference.responses import generate_responses
from residlab.traits.vectors import TraitVector, save_vector

SET = "baseline"
TRAIT = "test/cheer"


@pytest.fixture(scope="session")
def tuned_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama with perturbed MLP weights: a "fine-tune" with the same tokenizer."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("models") / "tiny-llama-tuned"
    shutil.copytree(tiny_llama_dir, path)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.mlp.down_proj.weight
            weight += 0.5 * torch.randn(weight.shape, generator=generator)
    model.save_pretrained(path)
    return path


@pytest.fixture
def experiment(tmp_path, monkeypatch, tiny_llama_dir, tuned_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    cpu = {"dtype": "fp32", "device": "cpu"}
    config = {"model_variants": {"base": {"model": str(tiny_llama_dir), **cpu},
                                 "tuned": {"model": str(tuned_dir), **cpu}},
              "defaults": {"application": "base", "extraction": "base"}}
    (tmp_path / "experiments" / "d").mkdir(parents=True)
    (tmp_path / "experiments" / "d" / "config.yaml").write_text(yaml.safe_dump(config))
    return load_experiment("d")


# --- hand-made inputs ----------------------------------------------------------------------

def _projection(experiment, variant, trait, folder, prompt_id, values, *, layer=3,
                requested=None, sha="v1"):
    path = projection_dir(experiment, variant, trait, folder) / f"{prompt_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"prompt_id": prompt_id, "vector_source": {
        "trait": trait, "layer": layer,
        "requested_layer": layer if requested is None else requested},
        "settings": {"vector": {"trait": trait, "layer": layer, "sha256": sha}}}
    path.write_text(json.dumps({"metadata": metadata, "projections": {
        "prompt": [0.0, 0.0], "response": list(values)}}))


def _response(experiment, variant, prompt_id, tokens, folder=SET):
    path = experiment.responses_dir(variant, folder) / f"{prompt_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "prompt": f"question {prompt_id}", "response": "".join(tokens),
        "tokens": ["<s>", "Q"] + tokens, "token_ids": list(range(len(tokens) + 2)),
        "prompt_end": 2}))


TOKENS = {
    "1": ["Yes", ",", " of", " course", ".", " Bye", "!"],
    "2": ["Well", " —", " no", ".", " ", "\n", "Fine"],
    "10": ["Sure", " thing"],
}
CLAUSES = {  # expected [start, end) by hand
    "1": [(0, 2), (2, 5), (5, 7)],
    "2": [(0, 2), (2, 4), (6, 7)],  # " " and "\n" alone are whitespace-only clauses
    "10": [(0, 2)],
}


def _handmade(experiment, traits=(TRAIT,), folder_a=SET, folder_b=SET, **kwargs):
    """Random projections of both variants for every prompt of TOKENS; returns A and B."""
    rng = np.random.default_rng(0)
    values = {}
    for trait in traits:
        for pid, tokens in TOKENS.items():
            a, b = rng.normal(size=len(tokens)), rng.normal(size=len(tokens)) + 0.5
            _projection(experiment, "base", trait, folder_a, pid, a, **kwargs)
            _projection(experiment, "tuned", trait, folder_b, pid, b, **kwargs)
            values[trait, pid] = (a, b)
    for pid, tokens in TOKENS.items():
        _response(experiment, "tuned", pid, tokens)
    return values


# --- clause split --------------------------------------------------------------------------

@pytest.mark.parametrize(("tokens", "expected"), [
    (["Hello", ",", " world", ".", " Bye"], [(0, 2), (2, 4), (4, 5)]),
    (["Mr", ".Smith", " said", " hi"], [(0, 2), (2, 4)]),  # punctuation inside a token
    (["e.g", " this", " one"], [(0, 1), (1, 3)]),
    (["wait", "\u2014", "no"], [(0, 2), (2, 3)]),  # em dash
    (["a\u2014b", " c"], [(0, 1), (1, 2)]),
    (["line", "\n", "next"], [(0, 2), (2, 3)]),
    (["Hi", ".", " ", "\n", "Ok"], [(0, 2), (4, 5)]),  # " \n" is whitespace only: dropped
    (["a", " b", " c"], [(0, 3)]),  # no punctuation at all
    (["well", "-", "known", ";", " x", "?", " y", ":", "z"],
     [(0, 4), (4, 6), (6, 8), (8, 9)]),  # a hyphen is no break
    (["a", "!"], [(0, 2)]),
    ([], []),
    (["  ", "\n"], []),
])
def test_split_clauses(tokens, expected):
    assert split_clauses(tokens) == expected


# --- per-token diff on hand-made files -----------------------------------------------------

def test_per_token_files_and_aggregate_recomputed(experiment):
    values = _handmade(experiment, traits=(TRAIT, "test/other"))
    written = per_token_diff(experiment, "base", "tuned", SET, top_pct=25)
    out = diff_dir(experiment, "base", "tuned") / "per_token_diff" / TRAIT / "L3" / SET
    assert out / "aggregate.json" in written and len(written) == 2 * (len(TOKENS) + 1)
    clauses = []
    for pid, tokens in TOKENS.items():
        record = json.loads((out / f"{pid}.json").read_text())
        a, b = values[TRAIT, pid]
        np.testing.assert_array_equal(record["per_token_delta"], b - a)
        assert record["tokens"] == tokens and record["trait"] == TRAIT
        assert record["prompt_text"] == f"question {pid}"
        assert record["response_text"] == "".join(tokens)
        assert math.isclose(record["mean_delta"], np.mean(b - a))
        assert math.isclose(record["std_delta"], np.std(b - a))
        expected = sorted(({"text": "".join(tokens[s:e]).strip(), "token_range": [s, e],
                            "mean_delta": float(np.mean((b - a)[s:e])),
                            "max_delta": float(np.max((b - a)[s:e])), "n_tokens": e - s}
                           for s, e in CLAUSES[pid]), key=lambda c: -c["mean_delta"])
        numbers = ("mean_delta", "max_delta")
        assert [{k: v for k, v in c.items() if k not in numbers} for c in record["clauses"]] == [
            {k: v for k, v in c.items() if k not in numbers} for c in expected]
        for name in numbers:
            assert [c[name] for c in record["clauses"]] == pytest.approx(
                [c[name] for c in expected])
        clauses += [(c["mean_delta"], pid, c["text"]) for c in expected]
    aggregate = json.loads((out / "aggregate.json").read_text())
    means = [np.mean(values[TRAIT, pid][1] - values[TRAIT, pid][0]) for pid in TOKENS]
    assert aggregate["n_prompts"] == 3 and aggregate["layer"] == 3
    assert math.isclose(aggregate["mean_delta_across_prompts"], np.mean(means))
    assert math.isclose(aggregate["std_delta_across_prompts"], np.std(means))
    position_0_2 = [np.mean([values[TRAIT, p][1][i] - values[TRAIT, p][0][i] for p in TOKENS])
                    for i in range(2)]
    position_6 = np.mean([values[TRAIT, p][1][6] - values[TRAIT, p][0][6] for p in ("1", "2")])
    assert aggregate["per_position_mean_delta"][:2] == pytest.approx(position_0_2)
    assert aggregate["per_position_mean_delta"][6] == pytest.approx(position_6)
    assert len(aggregate["per_position_mean_delta"]) == 7
    clauses.sort(reverse=True)
    n_top = math.ceil(len(clauses) * 0.25)  # 7 clauses -> 2
    assert [(c["prompt_id"], c["text"]) for c in aggregate["top_clauses_overall"]] == [
        (pid, text) for _, pid, text in clauses[:n_top]]
    assert [c["prompt_id"] for c in aggregate["bottom_clauses_overall"]] == [
        pid for _, pid, _ in clauses[::-1][:n_top]]
    printed = format_top_clauses(out / "aggregate.json")
    assert repr(clauses[0][2]) in printed and repr(clauses[-1][2]) in printed
    both = format_top_clauses(written)  # every aggregate among the files written
    assert printed in both and both.count("mean delta") == 2
    assert (diff_dir(experiment, "base", "tuned") / "per_token_diff" / "test/other" / "L3"
            / SET / "aggregate.json").is_file()


def test_layer_folders_and_other_prompt_set_for_a(experiment):
    for layer in (3, 5):
        _handmade(experiment, folder_a=f"{SET}_replay_L{layer}", folder_b=f"{SET}_L{layer}",
                  layer=layer)
    with pytest.raises(UsageError, match="per layer .*pass --layer"):
        per_token_diff(experiment, "base", "tuned", SET, trait=TRAIT,
                       variant_a_prompt_set=f"{SET}_replay")
    written = per_token_diff(experiment, "base", "tuned", SET, trait=TRAIT, layer=5,
                             variant_a_prompt_set=f"{SET}_replay")
    assert written[-1].parent.parent.name == "L5"
    aggregate = json.loads(written[-1].read_text())
    assert aggregate["variant_a_prompt_set"] == f"{SET}_replay"
    with pytest.raises(NotFound, match=r"at layer 4 .*layers \[3, 5\].*residlab project"):
        per_token_diff(experiment, "base", "tuned", SET, trait=TRAIT, layer=4,
                       variant_a_prompt_set=f"{SET}_replay")


def test_plain_folder_answers_for_its_recorded_layer(experiment):
    _handmade(experiment, layer=2, requested=3)  # asked for 3, snapped to the vector at 2
    for asked in (None, 2, 3):
        written = per_token_diff(experiment, "base", "tuned", SET, trait=TRAIT, layer=asked)
        assert written[-1].parent.parent.name == "L2"
    with pytest.raises(NotFound, match="at layer 1 .*layers \\[2, 3\\]"):
        per_token_diff(experiment, "base", "tuned", SET, trait=TRAIT, layer=1)


def test_bad_input_is_one_line(experiment):
    with pytest.raises(NotFound, match="no trait has projections for both variants"):
        per_token_diff(experiment, "base", "tuned", SET)
    _handmade(experiment)
    with pytest.raises(NotFound, match="no model variant 'nope'"):
        per_token_diff(experiment, "base", "nope", SET)
    with pytest.raises(NotFound, match="unknown trait 'test/typo'; traits with projections: "
                                       "test/cheer"):
        per_token_diff(experiment, "base", "tuned", SET, trait="test/typo")
    with pytest.raises(NotFound, match="for variant base on other.*'residlab project "
                                       "--experiment d --prompt-set other --model-variant base"):
        per_token_diff(experiment, "base", "tuned", SET, trait=TRAIT,
                       variant_a_prompt_set="other")
    _projection(experiment, "base", TRAIT, "lonely", "9", [1.0])
    _projection(experiment, "tuned", TRAIT, "lonely", "8", [1.0])
    with pytest.raises(UsageError, match="no common prompts"):
        per_token_diff(experiment, "tuned", "base", "lonely", trait=TRAIT)
    _projection(experiment, "base", TRAIT, SET, "2", [0.0] * 6)
    with pytest.raises(UsageError, match="prompt 2: base has 6 response tokens and tuned has 7"
                                         ".*--responses-from tuned"):
        per_token_diff(experiment, "base", "tuned", SET, trait=TRAIT)
    _projection(experiment, "base", TRAIT, SET, "2", [0.0] * 7, sha="v2")
    with pytest.raises(UsageError, match="prompt 2: .*different vectors"):
        per_token_diff(experiment, "base", "tuned", SET, trait=TRAIT)
    for error in (UsageError, NotFound):
        assert issubclass(error, ValueError)


# --- the real pipeline ---------------------------------------------------------------------

def test_pipeline_deltas_equal_projection_files_and_raw_captures(experiment):
    """tuned generates; both are captured on its tokens, projected, and diffed."""
    generate_responses(experiment, SET, variant="tuned", max_new_tokens=5, limit=2)
    capture_prompt_set(experiment, SET, variant="tuned", layers="1,2", dtype="fp32",
                       components=["residual"])
    capture_prompt_set(experiment, SET, variant="base", responses_from="tuned", layers="1,2",
                       dtype="fp32", components=["residual"])
    units = {}
    for layer in (1, 2):
        vector = torch.randn(64, generator=torch.Generator().manual_seed(layer))
        units[layer] = (vector / vector.norm()).double().numpy()
        save_vector(experiment, TraitVector(TRAIT, "base", "response[:5]", "residual",
                                            "mean_diff", layer, vector, {"effect_size": 1.0}))
    for variant in ("base", "tuned"):
        project_prompt_set(experiment, SET, variant=variant, layer="1", calibration=False)
        project_prompt_set(experiment, SET, variant=variant, layer="1,2", calibration=False)
    written = per_token_diff(experiment, "base", "tuned", SET, trait=TRAIT)
    assert written[-1].parent.parent.name == "L1" and len(written) == 3
    for path in written[:-1]:
        record = json.loads(path.read_text())
        pid = record["prompt_id"]
        proj = [json.loads((projection_dir(experiment, v, TRAIT, SET) / f"{pid}.json")
                           .read_text())["projections"]["response"] for v in ("base", "tuned")]
        np.testing.assert_array_equal(record["per_token_delta"],
                                      np.asarray(proj[1]) - np.asarray(proj[0]))
        raw = [load_raw(experiment.raw_dir(v, SET) / f"{pid}.safetensors") for v in
               ("base", "tuned")]
        h = [r["response"]["activations"][1]["residual"].double().numpy() for r in raw]
        np.testing.assert_allclose(record["per_token_delta"], (h[1] - h[0]) @ units[1],
                                   atol=1e-4)
        assert np.abs(record["per_token_delta"]).max() > 1e-3  # the variants really differ
        response = json.loads((experiment.responses_dir("tuned", SET) / f"{pid}.json")
                              .read_text())
        assert record["tokens"] == response["tokens"][response["prompt_end"]:]
    path = layer_sensitivity(experiment, "base", "tuned", SET, trait=TRAIT, layers=[1, 2])
    sensitivity = json.loads(path.read_text())
    assert sensitivity["layers"] == [1, 2] and sensitivity["n_prompts"] == 2
    for prompt in sensitivity["prompts"]:
        h = [load_raw(experiment.raw_dir(v, SET) / f"{prompt['prompt_id']}.safetensors")
             ["response"]["activations"] for v in ("base", "tuned")]
        for row, layer in zip(prompt["deltas"], (1, 2), strict=True):
            expected = (h[1][layer]["residual"] - h[0][layer]["residual"]).double().numpy()
            np.testing.assert_allclose(row, expected @ units[layer], atol=1e-4)


# --- layer sensitivity and spans on hand-made files ----------------------------------------

def _corrcoef(rows) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(rows)


def test_layer_sensitivity_correlations_match_numpy(experiment):
    values = {layer: _handmade(experiment, folder_a=f"{SET}_L{layer}",
                               folder_b=f"{SET}_L{layer}", layer=layer) for layer in (4, 8, 6)}
    constant = np.full(len(TOKENS["10"]), 0.25)  # prompt 10 at layer 6: a constant delta
    _projection(experiment, "base", TRAIT, f"{SET}_L6", "10", np.zeros(2), layer=6)
    _projection(experiment, "tuned", TRAIT, f"{SET}_L6", "10", constant, layer=6)
    values[6][TRAIT, "10"] = (np.zeros(2), constant)
    path = layer_sensitivity(experiment, "base", "tuned", SET, trait=TRAIT, layers=[4, 8, 6])
    assert path == diff_dir(experiment, "base", "tuned") / "layer_sensitivity" / TRAIT / (
        f"{SET}.json")
    record = json.loads(path.read_text())
    assert record["layers"] == [4, 8, 6] and record["vector_layers"] == [4, 8, 6]
    matrices, pooled = [], []
    for prompt in record["prompts"]:
        pid = prompt["prompt_id"]
        rows = np.stack([values[layer][TRAIT, pid][1] - values[layer][TRAIT, pid][0]
                         for layer in (4, 8, 6)])
        np.testing.assert_allclose(prompt["deltas"], rows)
        expected = _corrcoef(rows)
        got = np.array([[np.nan if v is None else v for v in row]
                        for row in prompt["correlation"]])
        np.testing.assert_allclose(got, expected, atol=1e-12)
        matrices.append(expected)
        pooled.append(rows)
    assert prompt["correlation"][2] == [None, None, None]  # prompt 10's constant layer
    np.testing.assert_allclose(record["mean_correlation"], np.nanmean(matrices, axis=0))
    np.testing.assert_allclose(record["pooled_correlation"],
                               np.corrcoef(np.concatenate(pooled, axis=1)))


def _span_inputs(experiment):
    values = _handmade(experiment)
    return {pid: values[TRAIT, pid][1] - values[TRAIT, pid][0] for pid in TOKENS}


@pytest.mark.parametrize("sort", ["abs", "pos", "neg", "z"])
def test_clause_spans_ranked_by_each_sort(experiment, sort):
    deltas = _span_inputs(experiment)
    every = np.concatenate(list(deltas.values()))
    mean, std = every.mean(), every.std()
    expected = []
    for pid, ranges in CLAUSES.items():
        for s, e in ranges:
            m = deltas[pid][s:e].mean()
            key = {"abs": -abs(m), "pos": -m, "neg": m, "z": -abs((m - mean) / std)}[sort]
            expected.append((key, pid, s, e, m))
    expected.sort(key=lambda x: x[0])
    spans = top_spans(experiment, "base", "tuned", SET, trait=TRAIT, sort=sort, top=4)
    assert [(s["prompt_id"], *s["token_range"]) for s in spans] == [
        (pid, s, e) for _, pid, s, e, _ in expected[:4]]
    for span, (_, pid, s, e, m) in zip(spans, expected, strict=False):
        assert span["mean_delta"] == pytest.approx(m)
        assert span["z"] == pytest.approx((m - mean) / std)
        assert span["text"] == "".join(TOKENS[pid][s:e])
        assert span["context_before"] == "".join(TOKENS[pid][max(s - 8, 0):s])
        assert span["context_after"] == "".join(TOKENS[pid][e:e + 8])
    assert format_spans(spans).count("\n") == len(spans) - 1


def test_window_and_prompt_spans(experiment):
    deltas = _span_inputs(experiment)
    spans = top_spans(experiment, "base", "tuned", SET, trait=TRAIT, mode="window", window=3,
                      sort="pos", top=50)
    windows = sorted((-deltas[pid][i:i + 3].mean(), pid, i) for pid in TOKENS
                     for i in range(max(len(TOKENS[pid]) - 3, 0) + 1))
    best = windows[0]
    assert (spans[0]["prompt_id"], spans[0]["token_range"][0]) == (best[1], best[2])
    assert spans[0]["mean_delta"] == pytest.approx(-best[0])
    short = [s for s in spans if s["prompt_id"] == "10"]  # 2 tokens < window: the whole response
    assert [s["token_range"] for s in short] == [[0, 2]]
    for pid in TOKENS:  # windows of one prompt never overlap
        ranges = sorted(s["token_range"] for s in spans if s["prompt_id"] == pid)
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    whole = top_spans(experiment, "base", "tuned", SET, trait=TRAIT, mode="prompt", sort="neg")
    assert [s["prompt_id"] for s in whole] == sorted(TOKENS, key=lambda p: deltas[p].mean())


def test_spans_of_logprob_deltas(experiment):
    folder = diff_dir(experiment, "base", "tuned") / "logprobs" / SET
    with pytest.raises(NotFound, match="residlab diff logprobs"):
        top_spans(experiment, "base", "tuned", SET, source="logprobs")
    folder.mkdir(parents=True)
    for pid, delta in (("1", [0.1, -2.0, -1.0, 0.2]), ("2", [0.5, 0.4, 3.0])):
        tokens = ["a", ",", " b", "."][: len(delta)]
        (folder / f"{pid}.json").write_text(json.dumps({
            "prompt_id": pid, "prompt_text": "q", "response_text": "".join(tokens),
            "tokens": tokens, "delta": delta, "logprob_a": [0.0] * len(delta),
            "logprob_b": delta, "kl": [0.0] * len(delta)}))
    spans = top_spans(experiment, "base", "tuned", SET, source="logprobs", sort="abs")
    assert [(s["prompt_id"], s["token_range"]) for s in spans] == [
        ("2", [2, 3]), ("1", [0, 2]), ("2", [0, 2]), ("1", [2, 4])]  # |3.0|, |-.95|, .45, -.4
    assert [s["mean_delta"] for s in spans] == pytest.approx([3.0, -0.95, 0.45, -0.4])
    with pytest.raises(UsageError, match="--sort 'up'"):
        top_spans(experiment, "base", "tuned", SET, source="logprobs", sort="up")
