"""Experiments, responses (Mode A/B) and raw activation capture against output_hidden_states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from residlab import models
from residlab.cli import main
from residlab.experiments import load_experiment, load_variant
from residlab.inference import capture as capture_module
from residlab.inference import raw as raw_module
from residlab.inference.capture import capture_prompt_set, parse_layers
from residlab.inference.raw import is_complete, load_raw
from residlab.inference.responses import FIELDS, generate_responses

SET = "baseline"  # 5 prompts shipped with residlab


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapters") / "tiny-lora"
    get_peft_model(base, config).save_pretrained(path)
    return path


@pytest.fixture
def experiment(tmp_path, monkeypatch, tiny_llama_dir, tiny_gemma2_dir, lora_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    cpu = {"dtype": "fp32", "device": "cpu"}
    config = {"model_variants": {
        "base": {"model": str(tiny_llama_dir), **cpu},
        "lora": {"model": str(tiny_llama_dir), "lora": str(lora_dir), **cpu},
        "gemma": {"model": str(tiny_gemma2_dir), **cpu},
    }, "defaults": {"application": "base", "extraction": "base"}}
    (tmp_path / "experiments" / "exp").mkdir(parents=True)
    (tmp_path / "experiments" / "exp" / "config.yaml").write_text(yaml.safe_dump(config))
    return load_experiment("exp")


def _forward_hidden(loaded, ids: list[int]):
    with torch.no_grad():
        return loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states


def test_mode_a_and_mode_b_same_shape_and_b_needs_no_weights(experiment, tmp_path, monkeypatch):
    written = generate_responses(experiment, SET, max_new_tokens=6, batch_size=2)
    assert len(written) == 5
    record_a = json.loads(written[0].read_text())
    assert list(record_a)[: len(FIELDS)] == list(FIELDS)
    assert record_a["prompt_end"] < len(record_a["token_ids"]) <= record_a["prompt_end"] + 6
    assert len(record_a["tokens"]) == len(record_a["token_ids"])

    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps({"1": "Mercury, Venus, Earth.", "3": "Water boils at 100 C."}))

    def no_weights(*args, **kwargs):
        raise AssertionError("Mode B must not load model weights")

    monkeypatch.setattr(models, "load_model", no_weights)
    imported = generate_responses(experiment, SET, from_responses=texts, output_suffix="ext")
    assert [p.name for p in imported] == ["1.json", "3.json"]
    record_b = json.loads(imported[0].read_text())
    assert set(record_b) == set(record_a)
    assert record_b["response"] == "Mercury, Venus, Earth."
    tokenizer = models.load_tokenizer(experiment.variant("base")[1].model)
    assert tokenizer.decode(record_b["token_ids"][record_b["prompt_end"]:]) == record_b["response"]
    assert record_b["token_ids"][: record_b["prompt_end"]] == (
        record_a["token_ids"][: record_a["prompt_end"]])


def test_skip_existing_and_limit(experiment):
    assert len(generate_responses(experiment, SET, max_new_tokens=3, limit=2)) == 2
    again = generate_responses(experiment, SET, max_new_tokens=3, skip_existing=True)
    assert [p.stem for p in again] == ["3", "4", "5"]


@pytest.mark.parametrize("variant", ["base", "gemma"])
def test_capture_matches_hidden_states_and_contributions_sum(experiment, variant):
    generate_responses(experiment, SET, variant=variant, max_new_tokens=5)
    result = capture_prompt_set(experiment, SET, variant=variant, capture_mlp=True,
                                dtype="fp32", batch_size=3)
    assert len(result.written) == 5
    loaded = load_variant(experiment, variant)
    n_layers = loaded.model.config.num_hidden_layers
    for path in result.written:
        raw = load_raw(path)
        ids = raw["prompt"]["token_ids"] + raw["response"]["token_ids"]
        hidden = _forward_hidden(loaded, ids)
        for layer in range(n_layers):
            parts = [raw[p]["activations"][layer] for p in ("prompt", "response")]
            joined = {c: torch.cat([p[c] for p in parts]) for c in parts[0]}
            pre = hidden[layer][0]
            if layer < n_layers - 1:  # the last hidden state is after the final norm
                torch.testing.assert_close(joined["residual"], hidden[layer + 1][0],
                                           atol=1e-5, rtol=1e-4)
            update = joined["attn_contribution"] + joined["mlp_contribution"]
            torch.testing.assert_close(update, joined["residual"] - pre, atol=1e-4, rtol=1e-4)


def test_batched_capture_equals_single_and_response_only_slices(experiment):
    generate_responses(experiment, SET, max_new_tokens=6)
    batched = capture_prompt_set(experiment, SET, dtype="fp32", batch_size=5)
    full = {p.stem: load_raw(p) for p in batched.written}
    single = capture_prompt_set(experiment, SET, dtype="fp32", batch_size=1)
    for path in single.written:
        one = load_raw(path)
        for part in ("prompt", "response"):
            for layer, comps in one[part]["activations"].items():
                for comp, tensor in comps.items():
                    torch.testing.assert_close(tensor, full[path.stem][part]["activations"][
                        layer][comp], atol=1e-5, rtol=1e-4)
    sliced = capture_prompt_set(experiment, SET, dtype="fp32", response_only=True, layers="1,3")
    for path in sliced.written:
        raw = load_raw(path)
        assert "prompt" not in raw and sorted(raw["response"]["activations"]) == [1, 3]
        response = json.loads((experiment.responses_dir("base", SET) / f"{path.stem}.json")
                              .read_text())
        n = len(response["token_ids"]) - response["prompt_end"]
        assert raw["response"]["activations"][1]["residual"].shape == (n, 64)
        assert torch.equal(raw["response"]["activations"][3]["residual"],
                           full[path.stem]["response"]["activations"][3]["residual"])
        assert raw["response"]["token_ids"] == response["token_ids"][response["prompt_end"]:]


def test_storage_is_tensor_bytes_plus_header(experiment):
    """No padding or copies on disk: file = 8 + header + tensor bytes, in bf16. (The 1.05x
    bound on bytes per token needs a real hidden size: see the slow embedded-model test.)"""
    import struct

    generate_responses(experiment, SET, max_new_tokens=4)
    result = capture_prompt_set(experiment, SET, layers="2", capture_mlp=True)
    for path in result.written:
        raw = load_raw(path)
        tensors = [t for part in ("prompt", "response")
                   for comps in raw[part]["activations"].values() for t in comps.values()]
        assert len(tensors) == 2 * 3 and all(t.dtype == torch.bfloat16 for t in tensors)
        payload = sum(t.numel() * t.element_size() for t in tensors)
        (header,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert path.stat().st_size == 8 + header + payload


def test_killed_capture_resumes_with_skip_existing(experiment, monkeypatch):
    generate_responses(experiment, SET, max_new_tokens=4)
    real_save, saved = raw_module.save_raw, []

    def crash_after_two(path, tensors, meta):
        if len(saved) == 2:
            raise KeyboardInterrupt
        real_save(path, tensors, meta)
        saved.append(path)

    monkeypatch.setattr(capture_module, "save_raw", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        capture_prompt_set(experiment, SET, batch_size=2)
    monkeypatch.setattr(capture_module, "save_raw", real_save)
    out_dir = experiment.raw_dir("base", SET)
    assert sorted(p.name for p in out_dir.glob("*.safetensors")) == sorted(p.name for p in saved)
    assert not list(out_dir.glob(".*.tmp"))
    victim = saved[0]  # a file cut short by a crash of some other kind
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{victim.name}.*corrupted or truncated"):
        load_raw(victim)
    with pytest.raises(ValueError, match=f"{victim.name}.*corrupted or truncated"):
        raw_module.read_parts(victim, 0, "residual")
    result = capture_prompt_set(experiment, SET, skip_existing=True)
    assert result.skipped == 1 and len(result.written) == 4
    for path in out_dir.glob("*.safetensors"):
        assert is_complete(path) and load_raw(path)["response"]["activations"]


def test_out_of_memory_halves_the_batch(experiment, monkeypatch, caplog):
    generate_responses(experiment, SET, max_new_tokens=3)
    real, sizes = capture_module.capture_records, []

    def small_memory(model, arch, records, *args, **kwargs):
        sizes.append(len(records))
        if len(records) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, arch, records, *args, **kwargs)

    monkeypatch.setattr(capture_module, "capture_records", small_memory)
    result = capture_prompt_set(experiment, SET, batch_size=8)
    assert len(result.written) == 5 and sizes[:3] == [5, 4, 2]
    assert "out of memory" in caplog.text


def test_lora_variant_and_model_diff(experiment):
    generate_responses(experiment, SET, variant="lora", max_new_tokens=5)
    generate_responses(experiment, SET, variant="base", max_new_tokens=5)
    lora_tokens = {p.stem: json.loads(p.read_text())["token_ids"]
                   for p in experiment.responses_dir("lora", SET).glob("*.json")}
    base_tokens = {p.stem: json.loads(p.read_text())["token_ids"]
                   for p in experiment.responses_dir("base", SET).glob("*.json")}
    assert lora_tokens != base_tokens  # the adapter changes the model
    diff = capture_prompt_set(experiment, SET, variant="base", responses_from="lora",
                              dtype="fp32")
    lora = capture_prompt_set(experiment, SET, variant="lora", dtype="fp32")
    for path in diff.written:
        raw_base = load_raw(path)
        raw_lora = load_raw(lora.out_dir / path.name)
        assert raw_base["metadata"]["responses_from"] == "lora"
        ids = raw_base["prompt"]["token_ids"] + raw_base["response"]["token_ids"]
        assert ids == lora_tokens[path.stem]
        a = raw_base["response"]["activations"][2]["residual"]
        assert not torch.allclose(a, raw_lora["response"]["activations"][2]["residual"])
    provenance = json.loads((lora.out_dir / "_provenance.json").read_text())
    assert provenance["model"]["lora"].endswith("tiny-lora")


def test_seed_pt_files_load_with_weights_only(tmp_path):
    seed = {"prompt": {"text": "hi", "tokens": ["hi"], "token_ids": [5],
                       "activations": {3: {"residual": torch.ones(1, 4)}}},
            "response": {"text": "", "tokens": [], "token_ids": [], "activations": {}}}
    torch.save(seed, tmp_path / "1.pt")
    loaded = load_raw(tmp_path / "1.pt")
    assert torch.equal(loaded["prompt"]["activations"][3]["residual"], torch.ones(1, 4))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match="evil.pt"):
        load_raw(tmp_path / "evil.pt")


def test_parse_layers():
    assert parse_layers(None, 30) == list(range(30))
    assert parse_layers("25,27,29", 30) == [25, 27, 29]
    assert parse_layers("10-28:3", 30) == [10, 13, 16, 19, 22, 25, 28]
    assert parse_layers("-1,0", 30) == [0, 29]
    for bad, message in [("1,x", "cannot read"), ("10-45:3", "out of range"), ("30", "range")]:
        with pytest.raises(ValueError, match=message):
            parse_layers(bad, 30)


def test_experiment_init(tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path))
    assert main(["experiment", "init", "demo"]) == 0
    experiment = load_experiment("demo")
    assert experiment.variant(None)[0] == "instruct"
    assert experiment.variant(None, "extraction")[1].model == "default"
    assert main(["experiment", "init", "demo"]) == 2


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "Traceback" not in "".join(lines)
    return lines[-1]


def test_bad_inputs(experiment, tmp_path, capsys):
    base = ["--experiment", "exp", "--prompt-set", SET]
    assert main(["responses", "--experiment", "nope", "--prompt-set", SET]) == 2
    assert "experiment 'nope' not found" in (err := _err(capsys)) and "exp" in err
    assert main(["responses", *base, "--model-variant", "nope"]) == 2
    assert "variants: base, gemma, lora" in _err(capsys)
    assert main(["responses", "--experiment", "exp", "--prompt-set", "nope"]) == 2
    assert "available:" in (err := _err(capsys)) and "single_trait" in err
    bad_set = tmp_path / "datasets" / "inference" / "broken.json"
    bad_set.parent.mkdir(parents=True)
    bad_set.write_text('[{"id": 1, "prompt": "hi"}, {"prompt": "no id"}]')
    assert main(["responses", "--experiment", "exp", "--prompt-set", "broken"]) == 2
    assert "broken.json: entry 1 needs an 'id'" in _err(capsys)
    texts = tmp_path / "t.json"
    texts.write_text(json.dumps({"1": "ok", "99": "not in the set"}))
    assert main(["responses", *base, "--from-responses", str(texts)]) == 2
    assert "ids not in the prompt set: 99" in _err(capsys)
    assert main(["capture", *base]) == 2
    assert "no response JSONs" in _err(capsys)
    assert main(["responses", *base, "--max-new-tokens", "3"]) == 0
    for layers, message in [("1-x", "cannot read"), ("0-9", "out of range")]:
        assert main(["capture", *base, "--layers", layers]) == 2
        assert message in _err(capsys)
    broken = experiment.responses_dir("base", SET) / "2.json"
    broken.write_text("{not json")
    assert main(["capture", *base]) == 2
    assert "2.json: not a readable response JSON" in _err(capsys)
    assert not experiment.raw_dir("base", SET).exists() or not list(
        experiment.raw_dir("base", SET).glob("*.safetensors"))


def test_seed_module_invocations(experiment, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "RESIDLAB_EXPERIMENTS_DIR": str(tmp_path / "experiments")}
    for module, extra in [("residlab.inference.generate_responses", ["--max-new-tokens", "2"]),
                          ("residlab.inference.capture_raw_activations", ["--layers", "0"])]:
        done = subprocess.run([sys.executable, "-m", module, "--experiment", "exp",
                               "--prompt-set", SET, *extra], capture_output=True, text=True,
                              cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr[-1500:]
    assert len(list(Path(experiment.raw_dir("base", SET)).glob("*.safetensors"))) == 5
