"""Command line: overrides, seed invocations, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from residlab.cli import main


@pytest.fixture
def write_config(tmp_path, tiny_llama_dir):
    def write(**changes) -> Path:
        config = dict(model_name=str(tiny_llama_dir), dtype="fp32", device="cpu", num_prompts=3,
                      max_prompt_len=64, batch_size=8, max_new_tokens=4, layer_index=1,
                      noise_norms=[0.0, 4.0], num_noise_vectors=2, seed=0,
                      output_dir=str(tmp_path / "out"))
        config.update(changes)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


def _fails(capsys, argv, match: str, out_dir: Path | None = None):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    err = err.splitlines()[-1]  # earlier lines: progress bars of the test's own setup
    assert err.startswith("residlab: error: "), err
    assert match in err, err
    if out_dir is not None:
        assert not out_dir.exists() or not any(p.name[0].isdigit() for p in out_dir.iterdir())
    return err


def test_generate_with_overrides(write_config, tmp_path, capsys):
    config = write_config()
    assert main(["noise", "generate", "--config", str(config), "--num-prompts", "2",
                 "--noise_norms", "0,1,3"]) == 0
    run_dir = Path(capsys.readouterr().out.split("run: ")[1].strip())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["num_prompts"] == 2 and saved["noise_norms"] == [0, 1, 3]
    lines = (run_dir / "generations" / "gens_noise_0001.jsonl").read_text().splitlines()
    assert [json.loads(x)["noise_scale"] for x in lines] == [0, 0, 1, 1, 3, 3]
    # A run's own config.yaml works as a config again.
    assert main(["noise", "generate", "--config", str(run_dir / "config.yaml")]) == 0


def test_seed_module_invocation(write_config, tmp_path):
    config = write_config(num_prompts=1, noise_norms=[1.0], num_noise_vectors=1)
    done = subprocess.run([sys.executable, "-m", "residlab.noising.generate", "--config",
                           str(config)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "run: " in done.stdout
    bad = subprocess.run([sys.executable, "-m", "residlab.noising.covariance", "--config",
                          str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_prompt": 3}, "did you mean 'num_prompts'"),
        ({"layer_index": 99}, "layer 99 is out of range"),
        ({"noise_norms": [1.0, -2.0]}, "must be a finite number >= 0"),
        ({"noise_norms": [float("nan")]}, "must be a finite number >= 0"),
        ({"noise_norm": float("inf"), "noise_norms": None}, "must be a finite number >= 0"),
        ({"noise_norms": None}, "set noise_norms"),
        ({"max_prompt_len": 2}, "no prompts left"),
        ({"dataset_path": "/nonexistent/prompts.jsonl"}, "not found"),
        ({"model_name": "/nonexistent/model-dir-or-id"}, "model folder"),
        ({"dtype": "int3"}, "'dtype'"),
        ({"site": "resid_middle"}, "'site'"),
    ],
)
def test_bad_config_values(write_config, tmp_path, capsys, changes, match):
    config = write_config(**changes)
    _fails(capsys, ["noise", "generate", "--config", str(config)], match, tmp_path / "out")


def test_bad_files(tmp_path, capsys, write_config):
    _fails(capsys, ["noise", "generate", "--config", str(tmp_path / "missing.yaml")], "not found")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_name: [unclosed\nlayer_index: 2\n")
    _fails(capsys, ["noise", "generate", "--config", str(broken)], "not valid YAML")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    _fails(capsys, ["noise", "generate", "--config", str(listed)], "must be a mapping")
    config = write_config()
    np.save(tmp_path / "wrong.npy", np.eye(5))
    _fails(capsys, ["noise", "generate", "--config", str(config), "--cov-sqrt",
                    str(tmp_path / "wrong.npy")], "hidden size is 64", tmp_path / "out")
    nan = np.eye(64)
    nan[3, 3] = np.inf
    np.save(tmp_path / "nan.npy", nan)
    _fails(capsys, ["noise", "generate", "--config", str(config), "--cov-sqrt",
                    str(tmp_path / "nan.npy")], "infinite", tmp_path / "out")
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"conversation": [{"role": "user", "content": "hi"}]}\n{"conver\n')
    _fails(capsys, ["noise", "generate", "--config", str(write_config(dataset_path=str(lines)))],
           "bad.jsonl:2", tmp_path / "out")


def test_unreachable_dataset(write_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(dataset_name="lmsys/lmsys-chat-1m")
    _fails(capsys, ["noise", "generate", "--config", str(config)], "dataset_path",
           tmp_path / "out")


def test_unknown_family(tmp_path, capsys, tiny_tokenizer, write_config):
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=2, vocab_size=len(tiny_tokenizer),
                                     word_embed_proj_dim=32, max_position_embeddings=128))
    model.save_pretrained(tmp_path / "opt")
    tiny_tokenizer.save_pretrained(tmp_path / "opt")
    config = write_config(model_name=str(tmp_path / "opt"))
    err = _fails(capsys, ["noise", "generate", "--config", str(config)],
                 "unsupported model family 'opt'", tmp_path / "out")
    assert "OPTForCausalLM" in err and "layers_path" in err
    # The hand-given layer path makes it work.
    assert main(["noise", "generate", "--config", str(config),
                 "--layers_path", "model.decoder.layers"]) == 0


def test_resume_errors(tmp_path, capsys, write_config):
    _fails(capsys, ["noise", "generate", "--resume", str(tmp_path)], "not a noising run")
    _fails(capsys, ["noise", "generate", "--resume", str(tmp_path / "nope")], "does not exist")
    _fails(capsys, ["noise", "generate", "--resume", str(tmp_path), "--seed", "3"],
           "keeps its own config")
