"""The model-diff pair (one load, adapter off / on) and the one-command workflow."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from residlab import models
from residlab.analysis.model_diff.run import adapter_side, load_pair
from residlab.experiments import Variant, load_experiment, load_variant
from residlab.inference.capture import capture_prompt_set
from residlab.inference.raw import load_raw
from residlab.inference.responses import generate_responses

SET = "baseline"  # 5 prompts shipped with residlab


@pytest.fixture(scope="module")
def tuned_lora(tmp_path_factory, tiny_llama_dir):
    """A tiny LoRA with non-zero B weights, so that it changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapters") / "tuned"
    get_peft_model(base, config).save_pretrained(path)
    return path


@pytest.fixture
def experiment(tmp_path, monkeypatch, tiny_llama_dir, tuned_lora):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    cpu = {"model": str(tiny_llama_dir), "dtype": "fp32", "device": "cpu"}
    config = {"model_variants": {"base": cpu, "tuned": {**cpu, "lora": str(tuned_lora)},
                                 "half": {**cpu, "dtype": "bf16"}},
              "defaults": {"application": "base", "extraction": "base"}}
    (tmp_path / "experiments" / "exp").mkdir(parents=True)
    (tmp_path / "experiments" / "exp" / "config.yaml").write_text(yaml.safe_dump(config))
    return load_experiment("exp")


def _count_loads(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = models.load_model

    def counting(name, **kwargs):
        calls.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    return calls


def test_adapter_side():
    plain = Variant(model="m", dtype="fp32")
    tuned = Variant(model="m", dtype="fp32", lora="adapter")
    assert adapter_side(plain, tuned) == "b" and adapter_side(tuned, plain) == "a"
    assert adapter_side(plain, plain) is None and adapter_side(tuned, tuned) is None
    assert adapter_side(Variant(model="m", dtype="bf16"), tuned) is None
    assert adapter_side(Variant(model="other", dtype="fp32"), tuned) is None


def _capture(experiment, variant: str, loaded, moved_to: str | None = None) -> dict:
    """Capture on the tuned variant's tokens; ``{id: raw}``, the folder renamed if asked."""
    result = capture_prompt_set(experiment, SET, variant=variant, responses_from="tuned",
                                loaded=loaded, dtype="fp32", batch_size=2,
                                components=["residual"])
    raws = {path.stem: load_raw(path) for path in result.written}
    provenance = json.loads((result.out_dir / "_provenance.json").read_text())
    if moved_to:
        shutil.move(result.out_dir, result.out_dir.with_name(moved_to))
    return {"raws": raws, "provenance": provenance}


def _residuals(raw: dict) -> torch.Tensor:
    layers = raw["response"]["activations"]
    return torch.stack([layers[layer]["residual"] for layer in sorted(layers)])  # (L, n, D)


def test_shared_pair_equals_each_variant_loaded_on_its_own(experiment, monkeypatch):
    loads = _count_loads(monkeypatch)
    pair = load_pair(experiment, "base", "tuned")
    assert pair.same_weights and loads == []  # nothing loaded before it is used
    with pair.switch("b") as tuned:
        generate_responses(experiment, SET, variant="tuned", max_new_tokens=5, loaded=tuned)
    with pair.switch("a") as base:
        shared_a = _capture(experiment, "base", base, moved_to="shared")
    with pair.switch("b") as tuned:
        shared_b = _capture(experiment, "tuned", tuned, moved_to="shared_tuned")
    assert len(loads) == 1  # one copy of the weights served both variants
    alone_a = _capture(experiment, "base", load_variant(experiment, "base"))
    alone_b = _capture(experiment, "tuned", load_variant(experiment, "tuned"))
    assert sorted(shared_a["raws"]) == sorted(alone_a["raws"]) and len(alone_a["raws"]) == 5
    for prompt_id, raw in shared_a["raws"].items():
        a, b = _residuals(raw), _residuals(shared_b["raws"][prompt_id])
        assert torch.equal(a, _residuals(alone_a["raws"][prompt_id]))
        assert torch.equal(b, _residuals(alone_b["raws"][prompt_id]))
        assert not torch.allclose(a, b)  # the adapter does change the model
    assert "lora" not in shared_a["provenance"]["model"]
    assert shared_a["provenance"]["model"]["variant"] == "base"
    assert shared_b["provenance"]["model"] == alone_b["provenance"]["model"]
    assert shared_a["provenance"]["model"] == alone_a["provenance"]["model"]


def test_unrelated_variants_load_one_each(experiment, monkeypatch):
    loads = _count_loads(monkeypatch)
    pair = load_pair(experiment, "base", "half")
    assert not pair.same_weights
    with pair.switch("a") as a, pair.switch("b") as b:
        assert a.model is not b.model
        assert (a.provenance["variant"], b.provenance["variant"]) == ("base", "half")
    assert len(loads) == 2


# --- run_diff --------------------------------------------------------------------------------

TRAIT, BEST_LAYER = "test/cheer", 2


def _store_vectors(experiment) -> dict[int, torch.Tensor]:
    """Random vectors at every layer; layer 2 has the best held-out effect size."""
    from residlab.traits.vectors import TraitVector, save_vector

    generator = torch.Generator().manual_seed(11)
    vectors = {}
    for layer in range(4):
        vectors[layer] = torch.randn(64, generator=generator)
        save_vector(experiment, TraitVector(TRAIT, "base", "response[:5]", "residual",
                                            "mean_diff", layer, vectors[layer],
                                            {"effect_size": 3.0 if layer == BEST_LAYER else 1.0,
                                             "accuracy": 1.0}))
    return vectors


def _snapshot(root) -> dict[str, int]:
    """Every file's modification time, but capture's ``_provenance.json`` (rewritten with the
    date on every capture call, by design of capture)."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.name != "_provenance.json"}


def _forward_logprobs(loaded, ids: list[int], end: int) -> torch.Tensor:
    """A plain forward: log p(token i | tokens < i) for the response tokens."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids])).logits[0].float()  # (T, V)
    logprobs = torch.log_softmax(logits[end - 1:-1], dim=-1)  # (n, V)
    return logprobs.gather(1, torch.tensor(ids[end:])[:, None])[:, 0]  # (n,)


def test_run_diff_end_to_end_then_rerun_does_nothing(experiment, monkeypatch):
    import numpy as np

    from residlab.analysis.model_diff.run import run_diff

    vectors = _store_vectors(experiment)
    loads = _count_loads(monkeypatch)
    run = run_diff(experiment, "base", "tuned", SET, max_new_tokens=5)
    assert run.same_weights and len(loads) == 1
    assert run.written["responses"] == 5 and run.written["capture"] == 10
    assert run.written["project"] == 10 and len(run.logprobs) == 5
    results = json.loads(run.results.read_text())
    assert results["n_prompts"] == 5 and TRAIT in results["traits"]
    unit = (vectors[BEST_LAYER] / vectors[BEST_LAYER].norm()).numpy()
    tuned, base = load_variant(experiment, "tuned"), load_variant(experiment, "base")
    for path in sorted(experiment.responses_dir("tuned", SET).glob("*.json")):
        record = json.loads(path.read_text())
        ids, end = record["token_ids"], record["prompt_end"]
        raw_a = load_raw(experiment.raw_dir("base", SET) / f"{path.stem}.safetensors")
        raw_b = load_raw(experiment.raw_dir("tuned", SET) / f"{path.stem}.safetensors")
        assert raw_a["response"]["token_ids"] == raw_b["response"]["token_ids"] == ids[end:]
        # per-token delta = B's projection - A's on the best vector, from the raw captures
        proj = [r["response"]["activations"][BEST_LAYER]["residual"].float().numpy() @ unit
                for r in (raw_a, raw_b)]
        diff = json.loads((run.out_dir / "per_token_diff" / TRAIT / f"L{BEST_LAYER}" / SET
                           / f"{path.stem}.json").read_text())
        np.testing.assert_allclose(diff["per_token_delta"], proj[1] - proj[0], atol=1e-5)
        assert np.abs(proj[1] - proj[0]).max() > 1e-3  # the adapter moved the projections
        # A and B log-probs equal a plain forward of each variant loaded on its own
        scored = json.loads((run.out_dir / "logprobs" / SET / f"{path.stem}.json").read_text())
        for key, loaded in (("logprob_a", base), ("logprob_b", tuned)):
            torch.testing.assert_close(torch.tensor(scored[key]),
                                       _forward_logprobs(loaded, ids, end), atol=1e-4, rtol=0)
    before = _snapshot(experiment.path)
    again = run_diff(experiment, "base", "tuned", SET, max_new_tokens=5)
    assert sum(again.written.values()) == 0 and again.results == run.results
    assert _snapshot(experiment.path) == before  # a rerun writes nothing
    run.results.unlink()  # an analysis output gone: the analyses are made again
    third = run_diff(experiment, "base", "tuned", SET, max_new_tokens=5)
    assert third.written["compare"] == 1 and third.written["capture"] == 0
    assert run.results.is_file()


def _forward_kl(base, tuned, ids: list[int], end: int) -> torch.Tensor:
    """KL(P_b || P_a) of the next-token distributions predicting each response token."""
    with torch.no_grad():
        log_a, log_b = (torch.log_softmax(m.model(torch.tensor([ids])).logits[0, end - 1:-1]
                                          .float(), dim=-1) for m in (base, tuned))  # (n, V)
    return (log_b.exp() * (log_b - log_a)).sum(-1)  # (n,)


def test_logprobs_come_from_the_captures_forwards(experiment, monkeypatch):
    """Fresh captures: the log-prob diff runs no body of its own (its scoring pass is made
    to fail) and still equals plain forwards; with the captures kept, the separate pass
    makes the same numbers."""
    from residlab.analysis.model_diff import logprobs as logprobs_module
    from residlab.analysis.model_diff.run import run_diff

    _store_vectors(experiment)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the bodies ran again for the log-probs")

    with monkeypatch.context() as patch:
        patch.setattr(logprobs_module, "_score_batch", no_second_pass)
        run = run_diff(experiment, "base", "tuned", SET, max_new_tokens=5)
    assert len(run.logprobs) == 5
    fused = {p.stem: json.loads(p.read_text()) for p in run.logprobs}
    tuned, base = load_variant(experiment, "tuned"), load_variant(experiment, "base")
    for path in sorted(experiment.responses_dir("tuned", SET).glob("*.json")):
        record = json.loads(path.read_text())
        ids, end = record["token_ids"], record["prompt_end"]
        torch.testing.assert_close(torch.tensor(fused[path.stem]["kl"]),
                                   _forward_kl(base, tuned, ids, end), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(fused[path.stem]["logprob_b"]),
                                   _forward_logprobs(tuned, ids, end), atol=1e-4, rtol=0)
    for path in run.logprobs:
        path.unlink()
    again = run_diff(experiment, "base", "tuned", SET, max_new_tokens=5)
    assert again.written["capture"] == 0 and len(again.logprobs) == 5
    for path in again.logprobs:
        separate = json.loads(path.read_text())
        for key in ("logprob_a", "logprob_b", "kl"):
            torch.testing.assert_close(torch.tensor(separate[key]),
                                       torch.tensor(fused[path.stem][key]), atol=1e-5, rtol=0)
