"""Typed options built from flags and files by one mechanism; the CLI's error boundary."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml

from residlab.cli import build_parser, main
from residlab.commands import COMMANDS
from residlab.commands.inference import ResponsesOptions
from residlab.commands.noise import NoiseGenerateOptions
from residlab.commands.traits import SteerOptions
from residlab.errors import UsageError
from residlab.options import normalize_dtype


def _options(argv: list[str]):
    args = build_parser().parse_args(argv)
    return args._command.options.from_flags(args)


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"noise_norms": [0.0, 8.0], "num_prompts": 3}))
    return path


def test_string_option_is_taken_as_typed(config_file):
    options = _options(["noise", "generate", "--config", str(config_file),
                        "--system_prompt", "a, b", "--model_name", "my,model"])
    assert isinstance(options, NoiseGenerateOptions)
    assert options.settings.system_prompt == "a, b"
    assert options.settings.model_name == "my,model"


def test_list_option_takes_one_value_or_many(config_file):
    one = _options(["noise", "generate", "--config", str(config_file), "--noise_norms", "4"])
    assert one.settings.noise_norms == [4.0]
    many = _options(["noise", "generate", "--config", str(config_file),
                     "--noise-norms", "0,2,4"])
    assert many.settings.noise_norms == [0.0, 2.0, 4.0]
    yaml_form = _options(["noise", "generate", "--config", str(config_file),
                          "--noise_norms", "[0, 16]"])
    assert yaml_form.settings.noise_norms == [0.0, 16.0]
    steer = _options(["steer", "--experiment", "e", "--trait", "t", "--layers", "-1",
                      "--coefficients", "8"])
    assert isinstance(steer, SteerOptions)
    assert steer.layers == [-1] and steer.coefficients == [8.0]


@pytest.mark.parametrize("argv", [
    ["noise", "generate", "--noise_norms", "0,0,4"],
    ["steer", "--experiment", "e", "--trait", "t", "--layers", "3,3", "--coefficients", "4"],
    ["extract", "--experiment", "e", "--traits", "a/b,a/b"],
])
def test_duplicates_are_rejected(argv):
    with pytest.raises(UsageError, match="twice"):
        _options(argv)


def test_duplicates_in_a_config_file_are_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("noise_norms: [0, 0, 4]\n")
    with pytest.raises(UsageError, match="twice"):
        _options(["noise", "generate", "--config", str(path)])


def test_switches_and_booleans(config_file):
    options = _options(["responses", "--experiment", "e", "--prompt-set", "s",
                        "--skip-existing"])
    assert isinstance(options, ResponsesOptions) and options.skip_existing is True
    shaped = _options(["noise", "generate", "--config", str(config_file),
                       "--shape_noise", "false"])
    assert shaped.settings.shape_noise is False
    with pytest.raises(UsageError, match="true or false"):
        _options(["noise", "generate", "--config", str(config_file), "--shuffle", "maybe"])


@pytest.mark.parametrize(("typed", "canonical"), [
    ("bf16", "bf16"), ("bfloat16", "bf16"), ("BFloat16", "bf16"), ("torch.bfloat16", "bf16"),
    ("fp16", "fp16"), ("float16", "fp16"), ("half", "fp16"),
    ("fp32", "fp32"), ("float32", "fp32"), ("float", "fp32"), ("auto", "auto"),
])
def test_dtype_names(typed, canonical, config_file, tmp_path):
    assert normalize_dtype(typed) == canonical
    options = _options(["noise", "generate", "--config", str(config_file), "--dtype", typed])
    assert options.settings.dtype == canonical
    from residlab.experiments import Variant

    assert Variant(dtype=typed).dtype == canonical


def test_dtype_auto_takes_the_checkpoint_dtype(tmp_path, tiny_llama_dir):
    import json
    import shutil

    from residlab.models import load_model

    copy = tmp_path / "bf16-model"
    shutil.copytree(tiny_llama_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["dtype"] = "float32"
    (copy / "config.json").write_text(json.dumps(config))
    assert load_model(str(copy), dtype="auto", device="cpu").dtype == torch.float32
    assert load_model(str(copy), dtype="float32", device="cpu").dtype == torch.float32
    with pytest.raises(UsageError, match="unknown dtype 'int3'"):
        load_model(str(copy), dtype="int3", device="cpu")


def test_flag_noise_norm_against_a_file_sweep_is_an_error(config_file):
    with pytest.raises(UsageError, match="--noise_norms 4"):
        _options(["noise", "generate", "--config", str(config_file), "--noise_norm", "4"])


def test_every_command_builds_its_options_from_flags():
    """Each command's parser and model agree: --help works and every field is a flag."""
    parser = build_parser()
    for command in COMMANDS:
        fields = set(command.options.model_fields) - {"settings"}
        sub = parser
        for part in command.path:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)
                       ).choices[part]
        dests = {action.dest for action in sub._actions}
        assert fields <= dests, (command.path, fields - dests)


def test_required_flag_and_bad_number_are_one_line(capsys):
    assert main(["capture", "--prompt-set", "s"]) == 2
    assert capsys.readouterr().err.strip() == "residlab: error: --experiment is required"
    assert main(["responses", "--experiment", "e", "--prompt-set", "s", "--batch-size",
                 "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("residlab: error: --batch-size:") and "\n" not in err


def test_internal_errors_show_a_traceback_and_exit_1(monkeypatch, capsys, tmp_path):
    def broken(options):
        raise KeyError("a bug")

    command = next(c for c in COMMANDS if c.path == ("calibrate",))
    monkeypatch.setitem(command.__dict__, "run", broken)  # a frozen dataclass: patch its dict
    assert main(["calibrate", "--experiment", "e"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "internal error" in err


def test_usage_errors_show_a_traceback_only_with_verbose(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path))
    assert main(["calibrate", "--experiment", "nope"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["-v", "calibrate", "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("'residlab experiment init nope'")


def test_full_disk_is_one_line(monkeypatch, capsys, tmp_path):
    import errno

    from residlab import store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path))
    monkeypatch.setattr(store, "write_bytes", full)
    assert main(["experiment", "init", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("residlab: error: No space left on device") and "\n" not in err
    assert not (tmp_path / "demo" / "config.yaml").exists()


def test_a_typo_is_answered_with_the_keys_of_its_own_section(tmp_path, monkeypatch):
    from residlab.experiments import load_experiment

    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.yaml").write_text(
        "model_variants:\n  base:\n    model: default\n    dtyp: fp32\n")
    with pytest.raises(UsageError, match="'model_variants.base.dtyp'; did you mean 'dtype'"):
        load_experiment("e")
    (tmp_path / "e" / "config.yaml").write_text(
        "model_variants:\n  base: {model: default}\ndefaults:\n  aplication: base\n")
    with pytest.raises(UsageError, match="did you mean 'application'"):
        load_experiment("e")


def test_resolved_options_and_provenance_are_written_next_to_outputs(tmp_path, monkeypatch,
                                                                     tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    (tmp_path / "experiments" / "e").mkdir(parents=True)
    (tmp_path / "experiments" / "e" / "config.yaml").write_text(yaml.safe_dump(
        {"model_variants": {"base": {"model": str(tiny_llama_dir), "dtype": "float32",
                                     "device": "cpu"}}}))
    assert main(["responses", "--experiment", "e", "--prompt-set", "baseline", "--limit", "2",
                 "--max-new-tokens", "3"]) == 0
    folder = tmp_path / "experiments" / "e" / "inference" / "base" / "responses" / "baseline"
    record = yaml.safe_load((folder / "_command.yaml").read_text())
    assert record["command"] == "residlab responses"
    assert record["options"]["max_new_tokens"] == 3 and record["options"]["limit"] == 2
    assert record["model"]["source"] == "local" and record["model"]["dtype"] == "float32"
    assert record["model"]["config_sha256"] and "torch" in record["libraries"]


def test_help_says_required_and_never_shows_an_internal_default():
    parser = build_parser()
    for command in COMMANDS:
        sub = parser
        for part in command.path:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)
                       ).choices[part]
        text = sub.format_help()
        assert "PydanticUndefined" not in text, command.path
        for name, field in command.options.model_fields.items():
            if field.is_required() and not (field.json_schema_extra or {}).get("positional"):
                action = next(a for a in sub._actions if a.dest == name)
                assert action.help.endswith("(required)"), (command.path, name)
