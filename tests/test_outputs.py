"""Outputs never overwrite each other, and responses and projections record what made them.

Oracles: plain greedy decodes (``generate_ids``), hashes computed here (``hashlib``), the
rendered chat template, and ``h @ v / |v|`` in numpy from the captured tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import torch
import yaml

from residlab.errors import UsageError
from residlab.experiments import load_experiment
from residlab.generation import effective_generation_settings, generate_ids
from residlab.inference import project as project_module
from residlab.inference import responses as responses_module
from residlab.inference.calibrate import calibration_path
from residlab.inference.capture import capture_prompt_set
from residlab.inference.project import project_prompt_set
from residlab.inference.prompt_sets import PromptItem
from residlab.inference.raw import load_raw
from residlab.inference.responses import generate_responses
from residlab.models import LoadedModel, load_tokenizer
from residlab.prompts import template_ids
from residlab.traits.vectors import TraitVector, save_vector

SET = "baseline"  # 5 prompts shipped with residlab
TRAIT = "test/cheer"
SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOL_TEMPLATE = (  # SmolLM2's template: a default system turn when none is given
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOL_DEFAULT + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture
def experiment(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    cpu = {"model": str(tiny_llama_dir), "dtype": "fp32", "device": "cpu"}
    (tmp_path / "experiments" / "t").mkdir(parents=True)
    (tmp_path / "experiments" / "t" / "config.yaml").write_text(yaml.safe_dump(
        {"model_variants": {"base": cpu, "smol": {**cpu, "model": "default"}},
         "defaults": {"application": "base", "extraction": "base"}}))
    return load_experiment("t")


def _texts(tmp_path, mapping: dict[str, str], name: str = "texts.json"):
    path = tmp_path / name
    path.write_text(json.dumps(mapping))
    return path


def _greedy(loaded, record: dict, max_new_tokens: int, **kwargs) -> list[int]:
    (out,) = generate_ids(loaded.model, loaded.tokenizer,
                          [record["token_ids"][:record["prompt_end"]]],
                          max_new_tokens=max_new_tokens, **kwargs)
    return out.token_ids


# --- responses: one setting per folder ------------------------------------------------------

def test_imported_responses_never_replace_generated_ones(experiment, tiny_llama, tmp_path):
    made = generate_responses(experiment, SET, max_new_tokens=3, limit=2, loaded=tiny_llama)
    before = [p.read_bytes() for p in made]
    texts = _texts(tmp_path, {"1": "Mercury, Venus, Earth."})
    with pytest.raises(UsageError, match=r"source \"generated\".*source \"imported\".*"
                                         r"--output-suffix"):
        generate_responses(experiment, SET, from_responses=texts)
    assert [p.read_bytes() for p in made] == before
    with pytest.raises(UsageError, match="would not redo them.*--output-suffix"):
        generate_responses(experiment, SET, from_responses=texts, skip_existing=True)
    assert [p.read_bytes() for p in made] == before
    (imported,) = generate_responses(experiment, SET, from_responses=texts, output_suffix="ext")
    assert imported.parent.name == f"{SET}_ext"
    assert [p.read_bytes() for p in made] == before


def test_other_settings_are_refused_and_skip_existing_redoes_them(experiment, tiny_llama,
                                                                  caplog):
    made = generate_responses(experiment, SET, max_new_tokens=3, limit=2, loaded=tiny_llama)
    before = [p.read_bytes() for p in made]
    with pytest.raises(UsageError, match="max_new_tokens 3 .*max_new_tokens 6.*--output-suffix"):
        generate_responses(experiment, SET, max_new_tokens=6, limit=2, loaded=tiny_llama)
    with pytest.raises(UsageError, match="would not redo"):  # 2 files, a run of 1 prompt
        generate_responses(experiment, SET, max_new_tokens=6, limit=1, loaded=tiny_llama,
                           skip_existing=True)
    assert [p.read_bytes() for p in made] == before
    with caplog.at_level(logging.INFO):
        redone = generate_responses(experiment, SET, max_new_tokens=6, limit=3, loaded=tiny_llama,
                                    skip_existing=True)
    assert [p.stem for p in redone] == ["1", "2", "3"]
    assert "1.json again: made with max_new_tokens 3, this run uses max_new_tokens 6" in caplog.text
    for path in redone:
        record = json.loads(path.read_text())
        assert record["token_ids"][record["prompt_end"]:] == _greedy(tiny_llama, record, 6)
        assert (record["source"], record["max_new_tokens"], record["temperature"]) == (
            "generated", 6, 0.0)
        assert record["generation_settings"] == effective_generation_settings(
            tiny_llama.model, tiny_llama.tokenizer, max_new_tokens=6, do_sample=False,
            temperature=1.0)
    assert generate_responses(experiment, SET, max_new_tokens=6, limit=3, loaded=tiny_llama,
                              skip_existing=True) == []


def test_skip_existing_redoes_a_response_whose_prompt_changed(experiment, tiny_llama, tmp_path):
    generate_responses(experiment, SET, max_new_tokens=3, limit=2, loaded=tiny_llama)
    folder = tmp_path / "datasets" / "inference"
    folder.mkdir(parents=True)
    (folder / f"{SET}.json").write_text(json.dumps([  # the user's set wins over the shipped one
        {"id": "1", "prompt": "List the planets in order from the sun."},
        {"id": "2", "prompt": "An edited prompt."}]))
    redone = generate_responses(experiment, SET, max_new_tokens=3, loaded=tiny_llama,
                                skip_existing=True)
    assert [p.stem for p in redone] == ["2"]
    record = json.loads(redone[0].read_text())
    assert record["prompt"] == "An edited prompt."
    assert record["token_ids"][:record["prompt_end"]] == template_ids(
        tiny_llama.tokenizer, [{"role": "user", "content": "An edited prompt."}])[1]


def test_imported_records_the_file_hash_and_the_model_without_weights(experiment, tmp_path,
                                                                      tiny_llama_dir,
                                                                      monkeypatch):
    from residlab import models

    def no_weights(*args, **kwargs):
        raise AssertionError("Mode B must not load model weights")

    monkeypatch.setattr(models, "load_model", no_weights)
    texts = _texts(tmp_path, {"1": "Mercury.", "3": "Boiling."})
    written = generate_responses(experiment, SET, from_responses=texts)
    record = json.loads(written[0].read_text())
    assert record["imported_sha256"] == hashlib.sha256(texts.read_bytes()).hexdigest()
    assert record["model_identity"]["config_sha256"] == hashlib.sha256(
        (tiny_llama_dir / "config.json").read_bytes()).hexdigest()
    assert record["inference_model"] == str(tiny_llama_dir.resolve())
    assert (record["source"], record["generation_settings"]) == ("imported", None)
    edited = _texts(tmp_path, {"1": "Mercury, Venus.", "3": "Boiling."})
    redone = generate_responses(experiment, SET, from_responses=edited, skip_existing=True)
    assert [p.stem for p in redone] == ["1", "3"]  # another file: its responses, all of them
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    new = json.loads(redone[0].read_text())
    assert tokenizer.decode(new["token_ids"][new["prompt_end"]:]) == "Mercury, Venus."


# --- responses: provenance ----------------------------------------------------------------

@pytest.fixture
def smol_like(tiny_llama, tiny_llama_dir):
    """The tiny Llama behind a tokenizer whose template injects a default system prompt, with
    the provenance the embedded model reports."""
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    tokenizer.chat_template = SMOL_TEMPLATE
    provenance = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, embedded)",
                  "source": "embedded-gguf", "file": "x.gguf", "sha256": "ab" * 32,
                  "dtype": "float32", "device": "cpu"}
    return LoadedModel(tiny_llama.model, tokenizer, "default", tiny_llama.device,
                       tiny_llama.dtype, provenance)


def test_the_template_default_system_prompt_and_the_real_model_are_recorded(
        experiment, smol_like, tiny_tokenizer, tmp_path):
    folder = tmp_path / "datasets" / "inference"
    folder.mkdir(parents=True)
    (folder / "sys.json").write_text(json.dumps([
        {"id": "a", "prompt": "Hello there."},
        {"id": "b", "prompt": "Hello there.", "system_prompt": "Be brief."}]))
    written = generate_responses(experiment, "sys", variant="smol", max_new_tokens=2,
                                 loaded=smol_like)
    plain, given = (json.loads(p.read_text()) for p in written)
    rendered = smol_like.tokenizer.decode(plain["token_ids"][:plain["prompt_end"]])
    assert f"system\n{SMOL_DEFAULT}<|im_end|>" in rendered
    assert plain["system_prompt"] == SMOL_DEFAULT
    assert given["system_prompt"] == "Be brief."
    assert SMOL_DEFAULT not in smol_like.tokenizer.decode(given["token_ids"])
    assert plain["inference_model"] == smol_like.provenance["model"]
    assert plain["model_identity"]["sha256"] == "ab" * 32
    assert (plain["system_prompt_source"], given["system_prompt_source"]) == (
        "chat template", "prompt set")
    from residlab.inference.responses import effective_system_prompt

    item = PromptItem("x", "Hello there.")
    text, _ = template_ids(tiny_tokenizer, item.messages())
    assert effective_system_prompt(tiny_tokenizer, item, text) == (None, None)


def test_generation_defaults_reach_the_decoder(experiment, tiny_llama):
    import copy

    model = copy.deepcopy(tiny_llama.model)
    model.generation_config.no_repeat_ngram_size = 1  # a checkpoint setting "model" picks up
    loaded = LoadedModel(model, tiny_llama.tokenizer, tiny_llama.name, tiny_llama.device,
                         tiny_llama.dtype, dict(tiny_llama.provenance))
    (path,) = generate_responses(experiment, SET, max_new_tokens=12, limit=1, loaded=loaded,
                                 generation_defaults="model")
    record = json.loads(path.read_text())
    response = record["token_ids"][record["prompt_end"]:]
    assert response == _greedy(loaded, record, 12, generation_defaults="model")
    assert response != _greedy(loaded, record, 12)  # the setting changes this decode
    assert record["generation_settings"]["no_repeat_ngram_size"] == 1
    assert record["generation_settings"]["generation_defaults"] == "model"


class _Recorder:
    """Stands in for ``progress``: keeps its arguments and the updates."""

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, iterable=None, **kwargs):
        self.calls.append({**kwargs, "updates": []})
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def update(self, n=1):
        self.calls[-1]["updates"].append(n)


def test_progress_counts_prompts_and_files_from_where_it_resumes(experiment, tiny_llama,
                                                                 monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(responses_module, "progress", _Recorder(calls))
    monkeypatch.setattr(project_module, "progress", _Recorder(calls))
    generate_responses(experiment, SET, max_new_tokens=2, limit=2, loaded=tiny_llama)
    generate_responses(experiment, SET, max_new_tokens=2, loaded=tiny_llama, batch_size=2,
                       skip_existing=True)
    assert calls[1] == {"total": 5, "desc": "responses", "unit": "prompts", "initial": 2,
                        "updates": [2, 1]}
    capture_prompt_set(experiment, SET, layers="1", dtype="fp32", loaded=tiny_llama)
    _store(experiment, 1)
    project_prompt_set(experiment, SET, layer="1", calibration=False)
    (experiment.inference_dir("base") / "projections" / TRAIT / SET / "4.json").unlink()
    project_prompt_set(experiment, SET, layer="1", calibration=False, skip_existing=True)
    assert calls[-1] == {"total": 5, "desc": "projecting", "unit": "files", "initial": 4,
                         "updates": [1]}


# --- projections ------------------------------------------------------------------------------

def _store(experiment, layer, seed=0, baseline=0.0) -> torch.Tensor:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(100 + layer + seed))
    save_vector(experiment, TraitVector(TRAIT, "base", "response[:5]", "residual", "mean_diff",
                                        layer, vector, {"effect_size": 1.0, "accuracy": 1.0,
                                                        "baseline": baseline}))
    return vector


def _captured(experiment, tiny_llama, n=2, max_new_tokens=3):
    generate_responses(experiment, SET, max_new_tokens=max_new_tokens, limit=n,
                       loaded=tiny_llama, skip_existing=True)
    capture_prompt_set(experiment, SET, dtype="fp32", loaded=tiny_llama, skip_existing=True)


def _expected(experiment, prompt_id, layer, vector, baseline=0.0) -> np.ndarray:
    raw = load_raw(experiment.raw_dir("base", SET) / f"{prompt_id}.safetensors")
    h = raw["response"]["activations"][layer]["residual"].double().numpy()
    return h @ (vector / vector.norm()).double().numpy() - baseline


def _read(experiment, folder, prompt_id="1") -> dict:
    path = experiment.inference_dir("base") / "projections" / TRAIT / folder / f"{prompt_id}.json"
    return json.loads(path.read_text())


def _calibrate_by_hand(experiment) -> None:
    path = calibration_path(experiment, "base")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"layers": {str(i): {"dims": [3, 7]} for i in range(4)}}))


def test_project_refuses_other_settings_and_a_suffix_keeps_both(experiment, tiny_llama):
    _captured(experiment, tiny_llama)
    vector = _store(experiment, 1, baseline=0.5)
    _calibrate_by_hand(experiment)
    written = project_prompt_set(experiment, SET, layer="1")
    before = [p.read_bytes() for p in written]
    for changes, named in [({"centered": True}, "centered false"),
                           ({"clean_massive_dims": True}, "clean_massive_dims false"),
                           ({"calibration": False}, "massive_dims \\[3, 7\\]")]:
        with pytest.raises(UsageError, match=f"holds projections made with {named}.*"
                                             "--output-suffix"):
            project_prompt_set(experiment, SET, layer="1", **changes)
    assert [p.read_bytes() for p in written] == before
    project_prompt_set(experiment, SET, layer="1", centered=True, clean_massive_dims=True,
                       output_suffix="centered")
    record = _read(experiment, f"{SET}_centered")
    np.testing.assert_allclose(record["projections"]["response"],
                               _expected(experiment, "1", 1, vector, 0.5), atol=1e-4)
    settings = record["metadata"]["settings"]
    unit_sha = hashlib.sha256(vector.float().numpy().tobytes()).hexdigest()
    assert settings["vector"] == {"trait": TRAIT, "variant": "base", "layer": 1,
                                  "method": "mean_diff", "position": "response[:5]",
                                  "component": "residual", "sha256": unit_sha}
    assert (settings["centered"], settings["baseline"], settings["clean_massive_dims"],
            settings["massive_dims"]) == (True, 0.5, True, [3, 7])
    raw = load_raw(experiment.raw_dir("base", SET) / "1.safetensors")
    ids = raw["prompt"]["token_ids"] + raw["response"]["token_ids"]
    assert record["metadata"]["capture_token_sha256"] == hashlib.sha256(
        json.dumps(ids, separators=(",", ":")).encode()).hexdigest()
    np.testing.assert_allclose(_read(experiment, SET)["projections"]["response"],
                               _expected(experiment, "1", 1, vector), atol=1e-4)


def test_project_skip_existing_redoes_stale_and_mismatched_files(experiment, tiny_llama,
                                                                  caplog):
    _captured(experiment, tiny_llama)
    _store(experiment, 1)
    project_prompt_set(experiment, SET, layer="1", calibration=False)
    assert project_prompt_set(experiment, SET, layer="1", calibration=False,
                              skip_existing=True) == []
    newer = _store(experiment, 1, seed=7)  # extracted again: same identity, other values
    with caplog.at_level(logging.INFO):
        redone = project_prompt_set(experiment, SET, layer="1", calibration=False,
                                    skip_existing=True)
    assert len(redone) == 2 and "vector.sha256" in caplog.text
    np.testing.assert_allclose(_read(experiment, SET)["projections"]["response"],
                               _expected(experiment, "1", 1, newer), atol=1e-4)
    _captured(experiment, tiny_llama, max_new_tokens=5)  # responses and captures made again
    caplog.clear()
    with caplog.at_level(logging.INFO):
        redone = project_prompt_set(experiment, SET, layer="1", calibration=False,
                                    skip_existing=True)
    assert len(redone) == 2 and "captured again" in caplog.text
    for prompt_id in ("1", "2"):
        np.testing.assert_allclose(_read(experiment, SET, prompt_id)["projections"]["response"],
                                   _expected(experiment, prompt_id, 1, newer), atol=1e-4)


def test_project_at_several_layers_writes_one_folder_per_layer(experiment, tiny_llama):
    _captured(experiment, tiny_llama)
    vectors = {layer: _store(experiment, layer) for layer in (1, 3)}
    written = project_prompt_set(experiment, SET, layer="1,-1", calibration=False)
    assert sorted({p.parent.name for p in written}) == [f"{SET}_L1", f"{SET}_L3"]
    assert len(written) == 4
    for layer, vector in vectors.items():
        for prompt_id in ("1", "2"):
            record = _read(experiment, f"{SET}_L{layer}", prompt_id)
            assert record["metadata"]["vector_source"]["layer"] == layer
            np.testing.assert_allclose(record["projections"]["response"],
                                       _expected(experiment, prompt_id, layer, vector),
                                       atol=1e-4)
    with pytest.raises(UsageError, match="out of range"):
        project_prompt_set(experiment, SET, layer="1,9", calibration=False)
