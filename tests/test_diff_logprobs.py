"""The behavioural diff (``diff_logprobs``) against a plain forward of each model.

Oracle: ``model(ids).logits.log_softmax(-1)`` in float64 for each variant on its own; the log-prob
of each response token, their difference, and ``sum p_b (log p_b - log p_a)`` at the position
that predicted it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from residlab.analysis.model_diff.logprobs import adapter_switch, diff_logprobs, logprobs_dir
from residlab.errors import NotFound, UsageError
from residlab.experiments import load_experiment, load_variant
from residlab.inference.responses import generate_responses

SET = "baseline"  # 5 prompts shipped with residlab
TEXTS = {"1": "Mercury, Venus, Earth.", "2": "Yes",
         "3": "Water boils at 100 C, at sea level; less on a mountain top.",
         "4": "The quick brown fox jumps over the lazy dog, twice.", "5": "Paris, bien sûr."}


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A second tiny Llama: same config and tokenizer as the fixture, another seed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    path = tmp_path_factory.mktemp("models") / "other-llama"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A tiny LoRA with non-zero B weights (so it changes the model)."""
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
def experiment(tmp_path, monkeypatch, tiny_llama_dir, tiny_gpt2_dir, other_llama_dir, lora_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    cpu = {"dtype": "fp32", "device": "cpu"}
    config = {"model_variants": {
        "base": {"model": str(tiny_llama_dir), **cpu},
        "other": {"model": str(other_llama_dir), **cpu},
        "lora": {"model": str(tiny_llama_dir), "lora": str(lora_dir), **cpu},
        "gpt2": {"model": str(tiny_gpt2_dir), **cpu},  # absolute positions: pads must not shift
    }, "defaults": {"application": "base"}}
    (tmp_path / "experiments" / "exp").mkdir(parents=True)
    (tmp_path / "experiments" / "exp" / "config.yaml").write_text(yaml.safe_dump(config))
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(TEXTS))
    experiment = load_experiment("exp")
    for variant in ("other", "lora", "gpt2"):  # Mode B: B's responses, prompts of different lengths
        generate_responses(experiment, SET, variant=variant, from_responses=texts)
    return experiment


def _oracle(model, ids: list[int], end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T-end, V)`` float64 log-probs of the positions predicting the response tokens, and
    the response tokens' own log-probs."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].double()  # (T, V)
    log_p = logits.log_softmax(-1)[end - 1:len(ids) - 1]  # (R, V)
    return log_p, log_p.gather(1, torch.tensor(ids[end:])[:, None])[:, 0]


def _check_against_forward(path: Path, response: dict, model_a, model_b) -> None:
    doc = json.loads(path.read_text())
    ids, end = response["token_ids"], response["prompt_end"]
    full_a, lp_a = _oracle(model_a, ids, end)
    full_b, lp_b = _oracle(model_b, ids, end)
    kl = (full_b.exp() * (full_b - full_a)).sum(-1)
    assert doc["token_ids"] == ids[end:]
    assert doc["tokens"] == response["tokens"][end:]
    assert doc["prompt_text"] == response["prompt"]
    assert doc["response_text"] == response["response"]
    close = dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(doc["logprob_a"]).double(), lp_a, **close)
    torch.testing.assert_close(torch.tensor(doc["logprob_b"]).double(), lp_b, **close)
    torch.testing.assert_close(torch.tensor(doc["delta"]).double(), lp_b - lp_a, **close)
    torch.testing.assert_close(torch.tensor(doc["kl"]).double(), kl, **close)
    assert doc["mean_delta"] == pytest.approx((lp_b - lp_a).mean().item(), abs=2e-5)
    assert doc["mean_kl"] == pytest.approx(kl.mean().item(), abs=2e-5)
    assert kl.min() > 1e-4  # the two models do differ: the comparison can fail


def _responses(experiment, variant: str) -> dict[str, dict]:
    folder = experiment.responses_dir(variant, SET)
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


@pytest.mark.parametrize("variant_b", ["other", "gpt2"])
def test_logprobs_and_kl_equal_a_plain_forward_of_each_model(experiment, variant_b):
    written = diff_logprobs(experiment, "base", variant_b, SET)
    assert [p.stem for p in written] == sorted(TEXTS)
    assert written[0].parent == logprobs_dir(experiment, "base", variant_b, SET)
    models = [load_variant(experiment, v).model for v in ("base", variant_b)]
    responses = _responses(experiment, variant_b)
    for path in written:
        _check_against_forward(path, responses[path.stem], *models)


@pytest.mark.parametrize("variant_b", ["other", "gpt2"])
def test_batched_equals_unbatched(experiment, variant_b):
    batched = [json.loads(p.read_text()) for p in diff_logprobs(experiment, "base", variant_b, SET)]
    single = [json.loads(p.read_text())
              for p in diff_logprobs(experiment, "base", variant_b, SET, batch_tokens=1)]
    for one, many in zip(single, batched, strict=True):
        assert one["token_ids"] == many["token_ids"]
        for key in ("logprob_a", "logprob_b", "delta", "kl"):
            torch.testing.assert_close(torch.tensor(one[key]), torch.tensor(many[key]),
                                       atol=1e-5, rtol=1e-5)


def test_one_shared_peft_model_equals_two_separate_loads(experiment):
    shared = load_variant(experiment, "lora")
    written = diff_logprobs(experiment, "base", "lora", SET, loaded_b=shared,
                            switch=adapter_switch(shared.model))
    settings = {p.stem: json.loads(p.read_text())["settings"] for p in written}
    base, lora = load_variant(experiment, "base").model, load_variant(experiment, "lora").model
    responses = _responses(experiment, "lora")
    for path in written:
        _check_against_forward(path, responses[path.stem], base, lora)
    # Separate loads record the same settings, so each path keeps the other's files.
    assert diff_logprobs(experiment, "base", "lora", SET, skip_existing=True) == []
    separate = diff_logprobs(experiment, "base", "lora", SET)
    assert {p.stem: json.loads(p.read_text())["settings"] for p in separate} == settings
    assert settings["1"]["model_a"]["model"] == str(experiment.variant("base")[1].model)


def test_skip_existing_keeps_only_files_of_the_same_tokens(experiment):
    diff_logprobs(experiment, "base", "other", SET)
    assert diff_logprobs(experiment, "base", "other", SET, skip_existing=True) == []
    path = experiment.responses_dir("other", SET) / "3.json"
    record = json.loads(path.read_text())
    record["token_ids"] = record["token_ids"][:record["prompt_end"]]  # now an empty response
    path.write_text(json.dumps(record))
    again = diff_logprobs(experiment, "base", "other", SET, skip_existing=True)
    assert [p.stem for p in again] == ["3"]
    doc = json.loads(again[0].read_text())
    assert doc["token_ids"] == doc["delta"] == doc["kl"] == []
    assert doc["mean_delta"] is None and doc["mean_kl"] is None


def test_bad_input_is_one_line(experiment):
    with pytest.raises(NotFound, match="residlab responses .*--model-variant base") as error:
        diff_logprobs(experiment, "other", "base", SET)
    assert "\n" not in str(error.value)
    with pytest.raises(NotFound, match="no model variant 'nope'"):
        diff_logprobs(experiment, "base", "nope", SET)
    path = experiment.responses_dir("other", SET) / "2.json"
    record = json.loads(path.read_text())
    record["token_ids"][-1] = 10_000
    path.write_text(json.dumps(record))
    with pytest.raises(UsageError, match=r"2\.json: token ids outside .*vocabulary") as error:
        diff_logprobs(experiment, "base", "other", SET)
    assert "\n" not in str(error.value)
    assert not logprobs_dir(experiment, "base", "other", SET).exists()  # nothing written
