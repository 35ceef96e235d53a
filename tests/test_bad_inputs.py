"""The bad-input table (README "Bad input"): every case is one line on stderr saying what is
wrong and how to fix it, exit status 2, no traceback, and nothing written or half-written."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from residlab.cli import main


@dataclass
class Case:
    name: str
    argv: Callable[[Ctx], list[str]]  # prepares what it needs, returns the command line
    match: str  # a piece of the one-line message


class Ctx:
    """A scratch folder with a tiny-llama experiment, noising configs and prompt files."""

    def __init__(self, root: Path, model_dir: Path):
        self.root, self.model_dir = root, model_dir
        self.out = root / "noising-out"

    def config(self, text: str | None = None, **changes) -> str:
        base = dict(model_name=str(self.model_dir), dtype="fp32", device="cpu", num_prompts=2,
                    max_prompt_len=64, batch_size=4, max_new_tokens=3, layer_index=1,
                    noise_norms=[0.0, 4.0], num_noise_vectors=2, seed=0,
                    output_dir=str(self.out))
        path = self.root / "config.yaml"
        path.write_text(text if text is not None else yaml.safe_dump({**base, **changes}))
        return str(path)

    def noise(self, *extra: str, **changes) -> list[str]:
        return ["noise", "generate", "--config", self.config(**changes), *extra]

    def file(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def experiment(self) -> list[str]:
        return ["--experiment", "exp"]

    def responses(self) -> None:
        """Baseline responses of the experiment's base variant (made before the snapshot)."""
        from residlab.experiments import load_experiment
        from residlab.inference.responses import generate_responses

        generate_responses(load_experiment("exp"), "baseline", max_new_tokens=3, limit=2)

    def run_dir(self) -> Path:
        """A finished noising run (no eval yet)."""
        from residlab.config import load_config
        from residlab.noising.generate import run_generate

        return run_generate(load_config(self.config()))

    def vector(self, d_model: int, layer: int = 1) -> None:
        from residlab.experiments import load_experiment
        from residlab.traits.vectors import TraitVector, save_vector

        save_vector(load_experiment("exp"), TraitVector(
            "test/cheer", "base", "response[:5]", "residual", "mean_diff", layer,
            torch.ones(d_model), {"effect_size": 1.0, "accuracy": 1.0, "baseline": 0.0}))


def _trait(ctx: Ctx, name: str, positive: str, negative: str) -> None:
    folder = ctx.root / "datasets" / "traits" / "test" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "positive.txt").write_text(positive)
    (folder / "negative.txt").write_text(negative)


def _corrupt_capture(ctx: Ctx) -> list[str]:
    from residlab.experiments import load_experiment
    from residlab.inference.capture import capture_prompt_set

    ctx.responses()
    result = capture_prompt_set(load_experiment("exp"), "baseline", dtype="fp32")
    victim = sorted(result.out_dir.glob("*.safetensors"))[-1]  # the last: nothing before it
    victim.write_bytes(victim.read_bytes()[:-100])
    ctx.vector(64)
    return ["project", *ctx.experiment(), "--prompt-set", "baseline", "--layer", "1",
            "--no-calibration"]


def _eval_dir(ctx: Ctx) -> list[str]:
    run = ctx.run_dir()
    return ["noise", "viz", "--run_dir", str(run)]


CASES = [
    # --- the noising runner's config and flags ---
    Case("malformed YAML", lambda c: ["noise", "generate", "--config",
                                      c.config("model_name: [unclosed\nseed: 1\n")],
         "is not valid YAML at line"),
    Case("config is not a mapping", lambda c: ["noise", "generate", "--config",
                                               c.config("- 1\n- 2\n")], "must be a mapping"),
    Case("unknown key", lambda c: c.noise(dtyp="fp32"),
         "unknown config key 'dtyp'; did you mean 'dtype'?"),
    Case("wrong type", lambda c: c.noise(num_prompts="many"), "'num_prompts'"),
    Case("unknown dtype", lambda c: c.noise(dtype="int3"), "'dtype'"),
    Case("out-of-range layer", lambda c: c.noise(layer_index=99), "layer 99 is out of range"),
    Case("negative norm", lambda c: c.noise(noise_norms=[1.0, -2.0]), "finite number >= 0"),
    Case("non-finite norm", lambda c: c.noise(noise_norms=[float("nan")]),
         "finite number >= 0"),
    Case("duplicate norms", lambda c: c.noise(noise_norms=[0.0, 0.0, 4.0]), "twice"),
    Case("flag sweep against file sweep", lambda c: c.noise("--noise_norm", "4"),
         "--noise_norms 4"),
    Case("generation beyond the context", lambda c: c.noise(max_new_tokens=600),
         "exceeds the model's context of 512 tokens"),
    Case("missing config file", lambda c: ["noise", "generate", "--config",
                                           str(c.root / "nope.yaml")], "not found"),
    Case("missing model", lambda c: c.noise(model_name=str(c.root / "no-model")),
         "model folder"),
    Case("empty prompt file", lambda c: c.noise(dataset_path=c.file("empty.jsonl", "")),
         "holds no conversations"),
    Case("no prompt fits", lambda c: c.noise(max_prompt_len=2),
         "fits max_prompt_len=2 tokens"),
    Case("config not UTF-8", lambda c: ["noise", "generate", "--config",
                                        c.file("latin1.yaml", "seed: 1 # caf\xe9\n".encode(
                                            "latin-1"))], "is not UTF-8 text"),
    Case("run stopped before its config", lambda c: (c.file("stopped/prompts.jsonl", ""), [
        "noise", "generate", "--resume", str(c.root / "stopped")])[1],
         "stopped before it wrote config.yaml"),
    Case("malformed prompt file", lambda c: c.noise(dataset_path=c.file(
        "bad.jsonl", '{"conversation": [{"role": "user", "content": "hi"}]}\n{"conver\n')),
         "bad.jsonl:2"),
    Case("missing covariance", lambda c: c.noise("--cov-sqrt", str(c.root / "no.npy")),
         "not found"),
    Case("covariance of another size", lambda c: c.noise(
        "--cov-sqrt", _npy(c, "small.npy", np.eye(5))), "hidden size is 64"),
    Case("non-finite covariance", lambda c: c.noise(
        "--cov-sqrt", _npy(c, "inf.npy", np.diag([np.inf] * 64))), "infinite"),
    Case("text file as covariance", lambda c: c.noise(
        "--cov-sqrt", c.file("text.npy", "not an array\n")), "cov_sqrt"),
    Case("unwritable output folder", lambda c: c.noise(
        output_dir=str(Path(c.file("a-file", "x")) / "out")), "writable output folder"),
    Case("resume with overrides", lambda c: ["noise", "generate", "--resume", str(c.root),
                                             "--seed", "3"], "keeps its own config"),
    Case("eval on a folder that is no run", lambda c: ["noise", "eval", "--run_dir",
                                                       str(c.root)], "not a noising run"),
    Case("viz before eval", _eval_dir, "residlab noise eval"),
    # --- experiments, responses, capture, projection ---
    Case("unknown experiment", lambda c: ["capture", "--experiment", "nope", "--prompt-set",
                                          "baseline"], "residlab experiment init nope"),
    Case("unknown variant", lambda c: ["responses", *c.experiment(), "--prompt-set",
                                       "baseline", "--model-variant", "big"],
         "has no model variant 'big'"),
    Case("unknown prompt set", lambda c: ["responses", *c.experiment(), "--prompt-set",
                                          "no_such_set"], "unknown prompt set"),
    Case("prompt set id clash", lambda c: (c.file("datasets/inference/clash.json", json.dumps(
        [{"id": "1", "prompt": "a"}, {"id": "1", "prompt": "b"}])), [
        "responses", *c.experiment(), "--prompt-set", "clash"])[1], "duplicate id '1'"),
    Case("empty prompt set", lambda c: (c.file("datasets/inference/none.json", "[]"), [
        "responses", *c.experiment(), "--prompt-set", "none"])[1], "has no prompts"),
    Case("non-number batch size", lambda c: ["capture", *c.experiment(), "--prompt-set",
                                             "baseline", "--batch-size", "x"],
         "--batch-size"),
    Case("unreadable layer list", lambda c: (c.responses(), [
        "capture", *c.experiment(), "--prompt-set", "baseline", "--layers", "2-x"])[1],
         "cannot read '2-x'"),
    Case("out-of-range capture layer", lambda c: (c.responses(), [
        "capture", *c.experiment(), "--prompt-set", "baseline", "--layers", "99"])[1],
         "out of range"),
    Case("capture before responses", lambda c: ["capture", *c.experiment(), "--prompt-set",
                                                "baseline"], "no response JSONs"),
    Case("steering with imported texts", lambda c: ["responses", *c.experiment(),
                                                    "--prompt-set", "baseline", "--steer",
                                                    "test/cheer:1:4", "--from-responses",
                                                    c.file("texts.json", "{}")],
         "drop one of them"),
    Case("vector of the wrong size", lambda c: (c.vector(10), [
        "responses", *c.experiment(), "--prompt-set", "baseline", "--steer",
        "test/cheer:1:4"])[1], "hidden size"),
    Case("corrupt capture file", _corrupt_capture, "corrupted or truncated"),
    # --- extract-viz ---
    Case("extract-viz with nothing to extract", lambda c: [
        "extract-viz", *c.experiment(), "--prompt-set", "baseline"], "nothing to extract"),
    Case("extract-viz without a prompt set", lambda c: [
        "extract-viz", *c.experiment(), "--logit-lens"], "give --prompt-set"),
    Case("extract-viz before responses", lambda c: [
        "extract-viz", *c.experiment(), "--prompt-set", "baseline", "--attention"],
         "no response JSONs"),
    Case("extract-viz layer out of range", lambda c: (c.responses(), [
        "extract-viz", *c.experiment(), "--prompt-set", "baseline", "--logit-lens",
        "--layers", "3,5"])[1], "layer 5 is out of range"),
    Case("extract-viz response whose prompt_end disagrees", lambda c: (
        c.responses(), c.file("experiments/exp/inference/base/responses/baseline/9.json",
                              json.dumps({"token_ids": [5, 6], "prompt_end": 4})), [
        "extract-viz", *c.experiment(), "--prompt-set", "baseline", "--logit-lens"])[2],
         "9.json: needs 'token_ids'"),
    Case("vector lens without vectors", lambda c: [
        "extract-viz", *c.experiment(), "--vectors", "--traits", "test/none"], "test/none"),
    # --- trait vectors ---
    Case("unknown trait", lambda c: ["extract", *c.experiment(), "--traits", "test/nothing"],
         "no data for trait 'test/nothing'"),
    Case("unequal contrastive files", lambda c: (_trait(c, "lop", "a\nb\nc\n", "a\n"), [
        "extract", *c.experiment(), "--traits", "test/lop"])[1], "has 3 lines but"),
    Case("unknown method", lambda c: ["extract", *c.experiment(), "--traits", "test/x",
                                      "--methods", "mean_diff,magic"], "--methods"),
    Case("test fraction out of range", lambda c: ["extract", *c.experiment(), "--traits",
                                                  "test/x", "--test-fraction", "1.5"],
         "--test-fraction"),
    Case("steer without layers", lambda c: ["steer", *c.experiment(), "--trait", "test/cheer"],
         "give --layers"),
    Case("non-number coefficient", lambda c: ["steer", *c.experiment(), "--trait", "t",
                                              "--layers", "1", "--coefficients", "4,x"],
         "--coefficients"),
]


def _npy(ctx: Ctx, name: str, array: np.ndarray) -> str:
    path = ctx.root / name
    np.save(path, array)
    return str(path)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder with its size and mtime (a new empty folder counts too)."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1,
                                       p.stat().st_mtime_ns if p.is_file() else 0)
            for p in root.rglob("*")}


@pytest.fixture
def ctx(tmp_path, monkeypatch, tiny_llama_dir) -> Ctx:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESIDLAB_EXPERIMENTS_DIR", str(tmp_path / "experiments"))
    cpu = {"dtype": "fp32", "device": "cpu"}
    config = {"model_variants": {"base": {"model": str(tiny_llama_dir), **cpu}},
              "defaults": {"application": "base", "extraction": "base"}}
    (tmp_path / "experiments" / "exp").mkdir(parents=True)
    (tmp_path / "experiments" / "exp" / "config.yaml").write_text(yaml.safe_dump(config))
    return Ctx(tmp_path, tiny_llama_dir)


def _one_line_error(capsys, argv: list[str]) -> str:
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, (status, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("residlab: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, ctx, capsys):
    argv = case.argv(ctx)  # may prepare files (responses, captures) first
    capsys.readouterr()
    before = _snapshot(ctx.root)
    line = _one_line_error(capsys, argv)
    assert case.match in line, line
    after = _snapshot(ctx.root)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


def test_full_disk_midway_leaves_nothing_half_written(ctx, capsys, monkeypatch):
    """A disk that fills while a file is written: one line, and no partial or temp file."""
    from residlab import store

    real_fdopen = os.fdopen

    class FillingStream:
        def __init__(self, handle):
            self.inner = real_fdopen(handle, "wb")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

        def write(self, data):
            self.inner.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fdopen", lambda handle, mode="r": FillingStream(handle))
    line = _one_line_error(capsys, ctx.noise())
    assert "No space left on device" in line
    leftovers = [p for p in ctx.root.rglob("*") if p.is_file()
                 and (p.name.endswith(".tmp") or "noising-out" in p.parts)]
    assert leftovers == [], leftovers
    runs = list(ctx.out.iterdir()) if ctx.out.is_dir() else []
    assert runs == [], f"a run directory was left behind: {runs}"
