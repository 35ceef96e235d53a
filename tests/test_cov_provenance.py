"""Noise is shaped only with a covariance estimated for the same model, layer and site.

Oracles: the saved noise bank is compared with ``noise_vectors`` shaped by the file that
should have been chosen (or by nothing), so a wrong choice shows up in the numbers too.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from residlab.config import NoisingConfig, load_config
from residlab.errors import UsageError
from residlab.noising.covariance import run_covariance
from residlab.noising.generate import run_generate
from residlab.noising.noise import find_cov_sqrt, model_identity, noise_vectors
from residlab.noising.runs import RunDir

D_MODEL = 64  # every tiny model here has hidden size 64, so shapes alone cannot tell them apart


def _config(tmp_path, model_dir, **changes) -> NoisingConfig:
    base = dict(model_name=str(model_dir), dtype="fp32", device="cpu", num_prompts=2,
                max_prompt_len=64, batch_size=4, max_new_tokens=3, layer_index=1,
                noise_norms=[0.0, 4.0], num_noise_vectors=2, seed=5, cov_batches=1,
                output_dir=str(tmp_path / "out"))
    return NoisingConfig(**{**base, **changes})


def _expected_noises(cfg: NoisingConfig, cov_sqrt: Path | None) -> np.ndarray:
    matrix = None if cov_sqrt is None else np.load(cov_sqrt)
    return noise_vectors(cfg.seed, cfg.num_noise_vectors, D_MODEL, matrix)  # (V, D)


def _saved(run_dir: Path) -> tuple[dict, np.ndarray]:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return config, RunDir(run_dir).read_noises(config["num_noise_vectors"])


def _refusal(cfg, loaded) -> str:
    """Generation must refuse before creating anything; returns the one-line message."""
    before = sorted(Path(cfg.output_dir).iterdir())
    with pytest.raises(UsageError) as error:
        run_generate(cfg, loaded=loaded)
    assert sorted(Path(cfg.output_dir).iterdir()) == before  # no run directory was made
    message = str(error.value)
    assert "\n" not in message and "residlab noise covariance" in message
    assert "--cov-sqrt" in message and "shape_noise: false" in message
    return message


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory, tiny_tokenizer):
    """A second tiny Llama, same hidden size, different config (another MLP width)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from residlab.models import load_model

    config = LlamaConfig(hidden_size=D_MODEL, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         vocab_size=len(tiny_tokenizer), bos_token_id=tiny_tokenizer.bos_token_id,
                         eos_token_id=tiny_tokenizer.eos_token_id,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("models") / "other-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path, load_model(str(path), dtype="fp32", device="cpu")


def test_estimate_records_what_it_describes(tmp_path, tiny_llama, tiny_llama_dir):
    cov_dir = run_covariance(_config(tmp_path, tiny_llama_dir, layer_index=-3,
                                     site="resid_post", cov_exclude_first=True), loaded=tiny_llama)
    record = json.loads((cov_dir / "estimate.json").read_text())
    assert record["model"] == {"source": "local", "model": str(Path(tiny_llama_dir).resolve()),
                               "config_sha256": tiny_llama.provenance["config_sha256"]}
    assert record["layer_index"] == 1  # -3 of 4 layers, normalised
    assert (record["site"], record["cov_exclude_first"], record["d_model"]) == (
        "resid_post", True, D_MODEL)
    assert record["tokens"] > 0 and record["dtype"] == "float32"
    # dtype, device and library versions are not part of which weights ran.
    assert model_identity({**tiny_llama.provenance, "dtype": "bfloat16", "device": "cuda"}) == \
        record["model"]


def test_estimate_for_another_layer_is_refused(tmp_path, tiny_llama, tiny_llama_dir):
    run_covariance(_config(tmp_path, tiny_llama_dir, layer_index=1), loaded=tiny_llama)
    message = _refusal(_config(tmp_path, tiny_llama_dir, layer_index=2), tiny_llama)
    assert "layer_index 1 (this run: 2)" in message
    message = _refusal(_config(tmp_path, tiny_llama_dir, site="mlp_out"), tiny_llama)
    assert "site resid_pre (this run: mlp_out)" in message


def test_estimate_for_another_model_is_refused(
    tmp_path, tiny_llama, tiny_llama_dir, tiny_gpt2, tiny_gpt2_dir, other_llama,
):
    run_covariance(_config(tmp_path, tiny_llama_dir), loaded=tiny_llama)
    llama_name = str(Path(tiny_llama_dir).resolve())
    message = _refusal(_config(tmp_path, tiny_gpt2_dir), tiny_gpt2)
    assert f"model {llama_name} (this run: {Path(tiny_gpt2_dir).resolve()})" in message
    other_dir, other_loaded = other_llama
    message = _refusal(_config(tmp_path, other_dir), other_loaded)
    assert llama_name in message and str(Path(other_dir).resolve()) in message


def test_explicit_foreign_cov_sqrt_warns_and_is_recorded(
    tmp_path, tiny_llama, tiny_llama_dir, caplog,
):
    cov_dir = run_covariance(_config(tmp_path, tiny_llama_dir, layer_index=1), loaded=tiny_llama)
    explicit = cov_dir / "cov_sqrt.npy"
    cfg = _config(tmp_path, tiny_llama_dir, layer_index=2)
    with caplog.at_level(logging.WARNING, logger="residlab"):
        run_dir = run_generate(cfg, cov_sqrt=str(explicit), loaded=tiny_llama)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(explicit) in w and "layer_index 1 (this run: 2)" in w for w in warnings)
    config, noises = _saved(run_dir)
    assert config["cov_sqrt_path"] == str(explicit)
    assert config["noise_shaping"]["estimate"]["layer_index"] == 1
    np.testing.assert_allclose(noises, _expected_noises(cfg, explicit), atol=1e-12)


def test_matching_estimate_is_picked_over_newer_foreign_ones(tmp_path, tiny_llama, tiny_llama_dir):
    matching = run_covariance(_config(tmp_path, tiny_llama_dir), loaded=tiny_llama)
    run_covariance(_config(tmp_path, tiny_llama_dir, layer_index=2), loaded=tiny_llama)
    # A newer estimate without a provenance record, and a legacy flat file: never picked.
    unknown = Path(str(matching) + "-9")
    shutil.copytree(matching, unknown)
    (unknown / "estimate.json").unlink(missing_ok=True)
    shutil.copy(matching / "cov_sqrt.npy", tmp_path / "out" / "cov_sqrt.npy")
    cfg = _config(tmp_path, tiny_llama_dir)
    config, noises = _saved(run_generate(cfg, loaded=tiny_llama))
    assert config["noise_shaping"]["cov_sqrt"] == str(matching / "cov_sqrt.npy")
    np.testing.assert_allclose(noises, _expected_noises(cfg, matching / "cov_sqrt.npy"),
                               atol=1e-12)


def test_unknown_provenance_is_used_only_when_named(tmp_path, tiny_llama, tiny_llama_dir):
    cov_dir = run_covariance(_config(tmp_path, tiny_llama_dir), loaded=tiny_llama)
    flat = tmp_path / "out" / "cov_sqrt.npy"
    shutil.move(cov_dir / "cov_sqrt.npy", flat)
    shutil.rmtree(cov_dir)
    cfg = _config(tmp_path, tiny_llama_dir)
    assert "has no estimate.json" in _refusal(cfg, tiny_llama)
    assert find_cov_sqrt(cfg.output_dir, str(flat)) == flat


def test_reused_run_config_keeps_its_cov_sqrt(tmp_path, tiny_llama, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir)
    first = run_covariance(cfg, loaded=tiny_llama) / "cov_sqrt.npy"
    run_dir = run_generate(cfg, loaded=tiny_llama)
    config, noises = _saved(run_dir)
    assert config["cov_sqrt_path"] == str(first)
    # A newer matching estimate (different tokens, so a different matrix) appears ...
    newer = run_covariance(cfg.model_copy(update={"cov_exclude_first": True}),
                           loaded=tiny_llama) / "cov_sqrt.npy"
    assert not np.allclose(np.load(first), np.load(newer))
    _, fresh = _saved(run_generate(cfg, loaded=tiny_llama))
    np.testing.assert_allclose(fresh, _expected_noises(cfg, newer), atol=1e-12)
    # ... but the run's own config.yaml, used again, still shapes with the first one.
    reused = load_config(run_dir / "config.yaml")
    again, again_noises = _saved(run_generate(reused, loaded=tiny_llama))
    assert again["cov_sqrt_path"] == str(first)
    np.testing.assert_allclose(again_noises, noises, atol=0)
    np.testing.assert_allclose(noises, _expected_noises(cfg, first), atol=1e-12)


def test_resume_keeps_the_saved_noise_bank(tmp_path, tiny_llama, tiny_llama_dir, caplog):
    cfg = _config(tmp_path, tiny_llama_dir)
    first = run_covariance(cfg, loaded=tiny_llama) / "cov_sqrt.npy"
    run_dir = run_generate(cfg, loaded=tiny_llama)
    records = sorted(p.read_text() for p in RunDir(run_dir).gens_files())
    run_covariance(cfg.model_copy(update={"cov_exclude_first": True}), loaded=tiny_llama)
    shutil.rmtree(run_dir / "generations")  # as if it had stopped before the end
    with caplog.at_level(logging.WARNING, logger="residlab"):
        run_generate(resume=run_dir, cov_sqrt=str(first), loaded=tiny_llama)
    assert "ignored when resuming" in caplog.text
    assert sorted(p.read_text() for p in RunDir(run_dir).gens_files()) == records


def test_no_estimate_warns_and_runs_unshaped(tmp_path, tiny_llama, tiny_llama_dir, caplog):
    cfg = _config(tmp_path, tiny_llama_dir)
    with caplog.at_level(logging.WARNING, logger="residlab"):
        config, noises = _saved(run_generate(cfg, loaded=tiny_llama))
    assert "NOT shaped" in caplog.text
    assert config["noise_shaping"]["shaped"] is False and config["cov_sqrt_path"] is None
    np.testing.assert_allclose(noises, _expected_noises(cfg, None), atol=1e-12)
