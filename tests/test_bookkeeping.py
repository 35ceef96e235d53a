"""Bookkeeping of layers, captures, projections and steering: every output says what it holds,
every setting that changes a result keys it, and nothing lands over something else."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import chat_ids
from residlab.errors import UsageError
from residlab.experiments import load_experiment
from residlab.generation import generate_ids
from residlab.hooks import Add
from residlab.inference.capture import capture_prompt_set
from residlab.inference.project import project_prompt_set
from residlab.inference.raw import load_raw, save_raw, tensor_name
from residlab.inference.responses import generate_responses
from residlab.traits.select import select_vectors
from residlab.traits.steer import (
    format_summary,
    load_results,
    run_steering,
    steering_interventions,
    summarize,
)
from residlab.traits.vectors import TraitVector, save_vector

SET = "baseline"
TRAIT = "test/cheer"


@pytest.fixture
def experiment(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    cpu = {"model": str(tiny_llama_dir), "dtype": "fp32", "device": "cpu"}
    (tmp_path / "experiments" / "t").mkdir(parents=True)
    (tmp_path / "experiments" / "t" / "config.yaml").write_text(yaml.safe_dump(
        {"model_variants": {"base": cpu, "other": cpu},
         "defaults": {"application": "base", "extraction": "base"}}))
    trait = tmp_path / "datasets" / "traits" / "test" / "cheer"
    trait.mkdir(parents=True)
    words = ["tides", "bread", "poem", "fox", "yeast"]
    (trait / "positive.txt").write_text("\n".join(f"I love the {w}!" for w in words))
    (trait / "negative.txt").write_text("\n".join(f"I hate the {w}." for w in words))
    (trait / "definition.txt").write_text("High: cheerful. Low: gloomy.")
    (trait / "steering.json").write_text(json.dumps({"questions": ["How are you?", "Hi"]}))
    return load_experiment("t")


def _store(experiment, layer, effect=1.0, *, method="mean_diff", position="response[:5]",
           component="residual", variant="base") -> torch.Tensor:
    """A seeded random vector (d=64, the tiny Llama's width) in the extraction layout."""
    vector = torch.randn(64, generator=torch.Generator().manual_seed(100 + layer))
    save_vector(experiment, TraitVector(TRAIT, variant, position, component, method, layer,
                                        vector, {"effect_size": effect, "accuracy": 1.0,
                                                 "baseline": 0.0}))
    return vector


def _capture(experiment, tiny_llama, layers=None, n=2, **kwargs):
    generate_responses(experiment, SET, max_new_tokens=3, limit=n, loaded=tiny_llama,
                       skip_existing=True)
    return capture_prompt_set(experiment, SET, layers=layers, dtype="fp32", loaded=tiny_llama,
                              **kwargs)


def _projection(experiment, prompt_id="1") -> dict:
    path = (experiment.inference_dir("base") / "projections" / TRAIT / SET
            / f"{prompt_id}.json")
    return json.loads(path.read_text())


# --- 1. negative layers and snapping ------------------------------------------------------

def test_steer_minus_one_is_the_last_layer_and_out_of_range_is_an_error(experiment,
                                                                        tiny_llama):
    _store(experiment, 0)
    last = _store(experiment, 3)  # the tiny Llama has 4 layers
    (add,) = steering_interventions(experiment, tiny_llama, [(TRAIT, -1, 8.0)])
    assert add.layer == 3
    torch.testing.assert_close(add.vectors, last / last.norm() * 8)
    with pytest.raises(UsageError, match="out of range"):
        steering_interventions(experiment, tiny_llama, [(TRAIT, 4, 8.0)])
    with pytest.raises(UsageError, match="out of range"):
        select_vectors(experiment, TRAIT, variant="base", layer=-5, n_layers=4)


def test_snapping_is_logged_and_recorded(experiment, caplog):
    _store(experiment, 0)
    _store(experiment, 3)
    with caplog.at_level(logging.WARNING):
        (choice,) = select_vectors(experiment, TRAIT, variant="base", layer=2)
    assert (choice.requested_layer, choice.vector.layer) == (2, 3)
    assert "nearest one, at layer 3" in caplog.text
    _store(experiment, 0, effect=9.0)  # best is layer 0; +4 is past the last layer
    with pytest.raises(UsageError, match="best\\+4 is layer 4, outside"):
        select_vectors(experiment, TRAIT, variant="base", layer="best+4", n_layers=4)


def test_project_layer_minus_one_and_snap_metadata(experiment, tiny_llama):
    _capture(experiment, tiny_llama)
    _store(experiment, 1)
    vector = _store(experiment, 3)
    project_prompt_set(experiment, SET, layer="-1", calibration=False)
    record = _projection(experiment)
    source = record["metadata"]["vector_source"]
    assert (source["layer"], source["requested_layer"]) == (3, 3)
    raw = load_raw(experiment.raw_dir("base", SET) / "1.safetensors")
    h = raw["response"]["activations"][3]["residual"].double().numpy()
    unit = (vector / vector.norm()).double().numpy()
    np.testing.assert_allclose(record["projections"]["response"], h @ unit, atol=1e-4)
    project_prompt_set(experiment, SET, layer="2", calibration=False, skip_existing=True)
    source = _projection(experiment)["metadata"]["vector_source"]
    assert (source["layer"], source["requested_layer"]) == (1, 2)


# --- 2. projection never writes empty files ----------------------------------------------

def test_project_refuses_captures_without_the_layer_before_writing(experiment, tiny_llama):
    _capture(experiment, tiny_llama, layers="0,1")
    _store(experiment, 3)
    out = experiment.inference_dir("base") / "projections"
    with pytest.raises(UsageError, match=r"1\.safetensors holds no residual at layer 3.*"
                                         r"--layers 0,1,3"):
        project_prompt_set(experiment, SET, layer="3", calibration=False)
    assert not out.exists()
    _store(experiment, 1, component="mlp_contribution")
    with pytest.raises(UsageError, match="holds no mlp_contribution at layer 1.*--capture-mlp"):
        project_prompt_set(experiment, SET, component="mlp_contribution", calibration=False)
    assert not out.exists()


def test_project_checks_every_file_before_writing_any(experiment, tiny_llama):
    _capture(experiment, tiny_llama)
    _store(experiment, 3)
    second = experiment.raw_dir("base", SET) / "2.safetensors"
    raw = load_raw(second)
    tensors = {tensor_name(part, 0, "residual"): raw[part]["activations"][0]["residual"]
               for part in ("prompt", "response")}
    meta = {**raw["metadata"], "parts": {p: {k: v for k, v in raw[p].items()
                                             if k != "activations"}
                                         for p in ("prompt", "response")}}
    save_raw(second, tensors, meta)  # this file holds layer 0 only
    with pytest.raises(UsageError, match="2.safetensors holds no residual at layer 3"):
        project_prompt_set(experiment, SET, layer="3", calibration=False)
    assert not (experiment.inference_dir("base") / "projections").exists()


# --- 3. captures say what they hold -------------------------------------------------------

def _forward_hidden(tiny_llama, ids):
    with torch.no_grad():
        return tiny_llama.model(torch.tensor([ids]), output_hidden_states=True).hidden_states


def test_skip_existing_recaptures_files_that_hold_something_else(experiment, tiny_llama,
                                                                  caplog):
    _capture(experiment, tiny_llama, layers="0,1")
    with caplog.at_level(logging.WARNING):
        result = _capture(experiment, tiny_llama, layers="1,2", skip_existing=True)
    assert result.skipped == 0 and len(result.written) == 2
    assert "holds layers [0, 1], asked [1, 2]" in caplog.text
    for path in result.written:
        raw = load_raw(path)
        assert sorted(raw["response"]["activations"]) == [1, 2]
        ids = raw["prompt"]["token_ids"] + raw["response"]["token_ids"]
        hidden = _forward_hidden(tiny_llama, ids)[3][0]  # block 2's output
        joined = torch.cat([raw[p]["activations"][2]["residual"] for p in ("prompt", "response")])
        torch.testing.assert_close(joined, hidden, atol=1e-5, rtol=1e-4)
    again = _capture(experiment, tiny_llama, layers="1,2", skip_existing=True)
    assert again.skipped == 2 and not again.written
    sliced = _capture(experiment, tiny_llama, layers="1,2", skip_existing=True,
                      response_only=True)
    assert len(sliced.written) == 2 and "prompt" not in load_raw(sliced.written[0])


def test_skip_existing_recaptures_when_the_tokens_changed(experiment, tiny_llama):
    _capture(experiment, tiny_llama, layers="1")
    generate_responses(experiment, SET, max_new_tokens=6, limit=2, loaded=tiny_llama,
                       skip_existing=True)
    result = capture_prompt_set(experiment, SET, layers="1", dtype="fp32", loaded=tiny_llama,
                                skip_existing=True)
    assert len(result.written) == 2
    for path in result.written:
        response = json.loads((experiment.responses_dir("base", SET) / f"{path.stem}.json")
                              .read_text())
        raw = load_raw(path)
        assert raw["prompt"]["token_ids"] + raw["response"]["token_ids"] == response["token_ids"]


def test_older_files_still_load_project_and_get_recaptured(experiment, tiny_llama, caplog):
    _capture(experiment, tiny_llama, layers="1")
    path = experiment.raw_dir("base", SET) / "1.safetensors"
    raw = load_raw(path)  # rewritten as an older response-only file: no hash, no layer count
    response = {k: v for k, v in raw["response"].items() if k != "activations"}
    save_raw(path, {tensor_name("response", 1, "residual"):
                    raw["response"]["activations"][1]["residual"]},
             {"parts": {"response": response}, "prompt_end": raw["metadata"]["prompt_end"],
              "response_only": True})
    vector = _store(experiment, 1)
    project_prompt_set(experiment, SET, layer="1", calibration=False)
    h = load_raw(path)["response"]["activations"][1]["residual"].double().numpy()
    np.testing.assert_allclose(_projection(experiment)["projections"]["response"],
                               h @ (vector / vector.norm()).double().numpy(), atol=1e-4)
    with caplog.at_level(logging.INFO):
        result = _capture(experiment, tiny_llama, layers="1", skip_existing=True)
    assert [p.name for p in result.written] == ["1.safetensors"]
    assert "older capture" in caplog.text and "prompt" in load_raw(path)


def test_provenance_claims_only_what_every_file_holds(experiment, tiny_llama):
    generate_responses(experiment, SET, max_new_tokens=3, limit=3, loaded=tiny_llama)
    capture_prompt_set(experiment, SET, layers="1,2", dtype="fp32", loaded=tiny_llama)
    stale = experiment.raw_dir("base", SET) / "9.safetensors"  # a prompt no longer in the set
    raw = load_raw(experiment.raw_dir("base", SET) / "1.safetensors")
    save_raw(stale, {tensor_name("response", 2, "residual"):
                     raw["response"]["activations"][2]["residual"]},
             {"parts": {"response": {"token_ids": raw["response"]["token_ids"]}}})
    capture_prompt_set(experiment, SET, layers="1,2", dtype="fp32", loaded=tiny_llama,
                       capture_mlp=True)
    provenance = json.loads((experiment.raw_dir("base", SET) / "_provenance.json").read_text())
    files = [load_raw(p) for p in experiment.raw_dir("base", SET).glob("*.safetensors")]
    pairs = set.intersection(*[{(layer, comp) for part in ("prompt", "response") if part in f
                                for layer, comps in f[part]["activations"].items()
                                for comp in comps} for f in files])
    assert pairs == {(2, "residual")}
    assert (provenance["layers"], provenance["components"]) == ([2], ["residual"])
    assert provenance["response_only"] is True and provenance["n_layers"] == 4
    assert provenance["last_run"]["components"] == ["residual", "attn_contribution",
                                                    "mlp_contribution"]


# --- 4. steering results keyed by every setting -------------------------------------------

class _Judge:
    scale = "from 0 to 100"

    def __init__(self, name: str, value: float):
        self.name, self.value = name, value

    def score(self, prompts: list[str]) -> list[float]:
        return [self.value] * len(prompts)


def test_steering_settings_never_replace_each_other(experiment, tiny_llama):
    _store(experiment, 1)
    common = {"layers": [1], "coefficients": [8.0], "loaded": tiny_llama, "batch_size": 8}
    run_steering(experiment, TRAIT, judge=_Judge("a", 40), max_new_tokens=2, **common)
    run_steering(experiment, TRAIT, judge=_Judge("a", 60), max_new_tokens=3, **common)
    run_steering(experiment, TRAIT, judge=_Judge("a", 70), max_new_tokens=2,
                 positions="generated", **common)
    results = load_results(experiment, TRAIT, "base")
    assert len(results) == 3 * 2 * 2  # 3 settings x (baseline + one row) x 2 questions
    short = [r for r in results if r["max_new_tokens"] == 2 and r["positions"] == "all"]
    plain = generate_ids(tiny_llama.model, tiny_llama.tokenizer,
                         chat_ids(tiny_llama.tokenizer, ["How are you?", "Hi"]),
                         max_new_tokens=2)
    baseline = {r["question"]: r["answer"] for r in short if r["layer"] is None}
    assert baseline == {q: tiny_llama.tokenizer.decode(g.token_ids, skip_special_tokens=True)
                        for q, g in zip(["How are you?", "Hi"], plain, strict=True)}
    summary = summarize(results)
    assert sorted((r["max_new_tokens"], r["positions"], r["trait"]) for r in summary
                  if r["layer"] is None) == [(2, "all", 40), (2, "generated", 70),
                                             (3, "all", 60)]
    text = format_summary(summary)
    assert "max_new_tokens=3" in text and "positions=generated" in text
    # --rescore judges the answers of exactly the setting asked, with a second judge kept apart
    run_steering(experiment, TRAIT, judge=_Judge("b", 10), max_new_tokens=2, rescore=True,
                 layers=[], coefficients=[])
    rescored = [r for r in load_results(experiment, TRAIT, "base") if r["judge"] == "b"]
    assert {(r["question"], r["answer"]) for r in rescored} == {
        (r["question"], r["answer"]) for r in short}
    assert len(load_results(experiment, TRAIT, "base")) == 3 * 4 + 4
    answers = experiment.path / "steering" / TRAIT / "base" / "answers"
    assert len(list(answers.glob("*.jsonl"))) == 3


# --- 5. best vector: only steering rows of that very vector count -------------------------

@pytest.mark.parametrize("other", [{"position": "prompt[-1]"}, {"component": "attn_contribution"},
                                   {"vector_variant": "other"}])
def test_best_vector_ignores_steering_of_other_vectors(experiment, other):
    _store(experiment, 1, effect=3.0)
    _store(experiment, 3, effect=1.0)
    setting = {"method": "mean_diff", "position": "response[:5]", "component": "residual",
               "vector_variant": "base", "positions": "all", "max_new_tokens": 8, "judge": "j",
               **other}
    rows = [{**setting, "layer": layer, "coefficient": coef, "question": q, "answer": "",
             "trait_score": trait, "coherence_score": 95}
            for layer, coef, trait in [(None, 0, 10), (3, 8, 90)] for q in ("a", "b")]
    folder = experiment.path / "steering" / TRAIT / "base"
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (chosen,) = select_vectors(experiment, TRAIT, variant="base")
    assert chosen.vector.layer == 1 and "effect size" in chosen.reason


# --- 6. steered responses go to their own folder ------------------------------------------

def test_steered_responses_get_their_own_folder_and_the_layer_used(experiment, tiny_llama):
    from residlab.traits.steer import resolve_steering

    vector = _store(experiment, 3)
    plain = generate_responses(experiment, SET, max_new_tokens=4, limit=2, loaded=tiny_llama)
    before = [p.read_bytes() for p in plain]
    steering = resolve_steering(experiment, tiny_llama, [(TRAIT, -1, 40.0)])
    steered = generate_responses(experiment, SET, max_new_tokens=4, limit=2, loaded=tiny_llama,
                                 steering=steering)
    assert steered[0].parent.name == "baseline_steer-test-cheer-L3-c40"
    assert [p.read_bytes() for p in plain] == before
    record = json.loads(steered[0].read_text())
    assert record["tags"] == ["steer:test/cheer:3:40"]
    assert (record["steering"][0]["requested_layer"], record["steering"][0]["layer"]) == (3, 3)
    prompt = record["token_ids"][:record["prompt_end"]]
    (by_hand,) = generate_ids(tiny_llama.model, tiny_llama.tokenizer, [prompt], max_new_tokens=4,
                              interventions=[Add(3, vector / vector.norm() * 40,
                                                 site="resid_post")])
    assert record["token_ids"][record["prompt_end"]:] == by_hand.token_ids
    generate_responses(experiment, SET, max_new_tokens=4, limit=1, loaded=tiny_llama,
                       output_suffix="x")
    with pytest.raises(UsageError, match="holds responses made with no steering"):
        generate_responses(experiment, SET, max_new_tokens=4, limit=1, loaded=tiny_llama,
                           output_suffix="x", steering=steering)


def test_interventions_from_python_never_land_with_unsteered_responses(experiment, tiny_llama):
    plain = generate_responses(experiment, SET, max_new_tokens=4, limit=2, loaded=tiny_llama)
    before = [p.read_bytes() for p in plain]
    add = Add(2, torch.full((64,), 5.0), site="resid_post")
    with pytest.raises(UsageError, match="own folder"):
        generate_responses(experiment, SET, max_new_tokens=4, limit=2, loaded=tiny_llama,
                           interventions=[add])
    assert [p.read_bytes() for p in plain] == before
    written = generate_responses(experiment, SET, max_new_tokens=4, limit=2, loaded=tiny_llama,
                                 interventions=[add], output_suffix="pushed")
    assert json.loads(written[0].read_text())["interventions"] == [
        {"kind": "Add", "layer": 2, "site": "resid_post", "positions": "all"}]


# --- 7. no import cycle between selection and steering ------------------------------------

def test_select_does_not_import_steer():
    code = ("import sys, residlab.traits.select; "
            "assert 'residlab.traits.steer' not in sys.modules, 'select imports steer'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-800:]
