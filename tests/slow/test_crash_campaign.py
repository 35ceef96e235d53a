"""Crash campaign: SIGKILL long commands at random moments, resume them, compare with an
uninterrupted run.

For each of ``noise generate`` (``--resume RUN``), ``noise eval`` (same ``--run-dir``),
``capture`` (``--skip-existing``), ``extract`` and ``steer`` (same flags) on the embedded
model: one uninterrupted run measures the command's duration; a fresh copy of the same inputs
is then killed at 5 seeded moments spread over that duration (each kill hits the process
resuming from the previous one) and finally resumed to completion. The two trees must hold
the same files with the same records and tensors, no record twice, no temp file left and
nothing that fails to parse. Kill moments are seeded; the state a kill interrupts still
depends on the machine's speed, so each failure message carries the campaign's log.

Two more tests place a kill deterministically where random kills rarely land: just before an
atomic write renames its finished temp file into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from crashkit import (
    Campaign,
    Outcome,
    compare_trees,
    damaged_files,
    duplicate_records,
    kill_before_rename,
    kill_plan,
    read_tree,
    run_cli,
)

pytestmark = pytest.mark.slow

SEED = 1124
NOISE_CONFIG = {  # 3 prompts x 2 vectors x 2 scales; zero-norm rows shared: 9 rows, 5 shards
    "model_name": "default", "dtype": "fp32", "device": "cpu", "num_prompts": 3,
    "num_noise_vectors": 2, "noise_norms": [0.0, 8.0], "max_new_tokens": 8, "batch_size": 2,
    "layer_index": 8, "seed": 3, "output_dir": "out", "max_prompt_len": 128,
}
PROMPTS = ["Say hi.", "Name a color.", "What is 2+2?", "Tell me a fruit.",
           "Describe rain in three words.", "Give me a short greeting."]
CALM = [("The train is late again.", "No problem at all, I will calmly",
         "This is outrageous, I am furious and"),
        ("My code has a bug.", "Let's take a slow breath and calmly",
         "I am panicking, everything is broken and"),
        ("The meeting got moved.", "That's fine, I feel relaxed and",
         "Unbelievable, I'm so angry that"),
        ("It's raining on my walk.", "I love the peaceful sound, so I",
         "I hate this, I'm fuming because"),
        ("I spilled my coffee.", "Oh well, no stress, I'll gently",
         "Argh, I'm livid and screaming because"),
        ("My flight was delayed.", "That's okay, I'll relax with a book and",
         "I'm enraged, I will yell at")]
GENERATE = ["noise", "generate", "--config", "noise.yaml"]
CAPTURE = ["capture", "--experiment", "e", "--prompt-set", "crash", "--batch-size", "1",
           "--skip-existing"]
EXTRACT = ["extract", "--experiment", "e", "--traits", "crash/calm", "--methods",
           "mean_diff,pca", "--layers", "8-16:4", "--max-new-tokens", "4"]
STEER = ["steer", "--experiment", "e", "--trait", "crash/calm", "--layers", "12",
         "--coefficients", "48", "--max-new-tokens", "6"]


def _write_inputs(root: Path) -> None:
    """Noise config, a 6-prompt set and a 6-pair trait with 2 questions (ours win over the
    shipped ones because the commands run with ``cwd=root``)."""
    (root / "noise.yaml").write_text(yaml.safe_dump(NOISE_CONFIG))
    sets = root / "datasets" / "inference"
    sets.mkdir(parents=True)
    (sets / "crash.json").write_text(json.dumps(
        [{"id": f"p{i}", "prompt": text} for i, text in enumerate(PROMPTS)]))
    trait = root / "datasets" / "traits" / "crash" / "calm"
    trait.mkdir(parents=True)
    for side, index in (("positive", 1), ("negative", 2)):
        (trait / f"{side}.txt").write_text("".join(
            f"User: {row[0]} Assistant: {row[index]}\n" for row in CALM))
    (trait / "definition.txt").write_text("Trait: calm. HIGH: relaxed, patient, unhurried. "
                                          "LOW: angry, panicked, shouting.\n")
    (trait / "steering.json").write_text(json.dumps(
        {"questions": ["My bus is late. How do you feel?", "What do you do when plans change?"]}))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """``fresh(source, name)``: a new copy of a tree to run commands in."""
    def copy(source: Path, name: str) -> Path:
        return Path(shutil.copytree(source, tmp_path_factory.mktemp(name) / "w", symlinks=True))
    return copy


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Inputs of every command; experiment ``e`` from ``experiment init``, fp32 on CPU."""
    root = tmp_path_factory.mktemp("world")
    _write_inputs(root)
    run_cli(["experiment", "init", "e"], root).check()
    path = root / "experiments" / "e" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    for variant in config["model_variants"].values():
        variant.update(dtype="fp32", device="cpu")
    path.write_text(yaml.safe_dump(config))
    return root


def _runs(root: Path) -> list[Path]:
    """Resumable noising runs (config.yaml is written last among a run's first files)."""
    return sorted(p for p in (root / "out").glob("*") if (p / "config.yaml").is_file())


def _reference(root: Path, args: list[str], watch: str) -> tuple[Path, Outcome]:
    """The uninterrupted run; ``watch`` (under ``root``) times its first write."""
    return root, run_cli(args, root, watch=root / watch).check()


def _campaign(root: Path, start: list[str], reference: Outcome, *, watch: str,
              keeps_progress: bool, resume=None) -> Campaign:
    campaign = Campaign(root, root / watch)
    campaign.log.append(f"reference: {reference.seconds:.1f} s, first write at "
                        f"{reference.first_change or float('nan'):.1f} s")
    plan = kill_plan(SEED, reference, keeps_progress=keeps_progress)
    campaign.run(start, resume or (lambda: start), plan,
                 after_kill=lambda: damaged_files(root, during=True))
    return campaign


def _assert_same(reference: Path, crashed: Path, campaign: Campaign,
                 rename: dict[Path, str] | None = None) -> None:
    """Same files, same records and tensors, nothing doubled, torn or left behind."""
    def names(root: Path) -> dict[str, str]:
        return {p.name: new for p, new in (rename or {}).items() if p.is_relative_to(root)}

    print(campaign.report())  # where the kills landed (shown with pytest -rP)
    expected = read_tree(reference, replace=names(reference))
    got = read_tree(crashed, replace=names(crashed))
    problems = (campaign.problems() + damaged_files(crashed) + duplicate_records(got)
                + compare_trees(expected, got))
    assert not problems, "\n".join([*problems, "campaign:", campaign.report()])
    assert not damaged_files(reference) and not duplicate_records(expected)


# ---- the checks themselves can fail ------------------------------------------------------


def test_checks_catch_torn_doubled_and_changed_files(tmp_path):
    from safetensors.torch import save_file

    good, bad = tmp_path / "good", tmp_path / "bad"
    for root in (good, bad):
        root.mkdir()
        (root / "a.jsonl").write_text('{"noise_id": 0, "noise_scale": 1.0, "prompt_index": 2}\n')
        save_file({"x": torch.arange(6.0).reshape(2, 3)}, str(root / "t.safetensors"),
                  metadata={"residlab": '{"date": "today", "layer": 3}'})
    assert not damaged_files(good) and compare_trees(read_tree(good), read_tree(bad)) == []
    save_file({"x": torch.tensor([[0.0, 1, 2], [3, 4, 5.5]])}, str(bad / "t.safetensors"),
              metadata={"residlab": '{"date": "later", "layer": 3}'})  # only the date is volatile
    assert compare_trees(read_tree(good), read_tree(bad)) == ["t.safetensors/tensors/x: "
                                                              "tensors differ"]
    (bad / "a.jsonl").write_text(2 * (good / "a.jsonl").read_text())
    assert duplicate_records(read_tree(bad)) and compare_trees(read_tree(good), read_tree(bad))
    (bad / "a.jsonl").write_text('{"noise_id": 0, "noise_sc')
    (bad / ".t.safetensors.1234.tmp").write_bytes(b"\0" * 8)
    (bad / "c.safetensors").write_bytes((good / "t.safetensors").read_bytes()[:-4])
    def names(problems: list[str]) -> list[str]:
        return [problem.split(":")[0] for problem in problems]

    assert names(damaged_files(bad)) == [".t.safetensors.1234.tmp", "a.jsonl", "c.safetensors"]
    assert names(damaged_files(bad, during=True)) == ["c.safetensors"]  # a torn log tail is ok


# ---- noise generate / eval ---------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(world, fresh) -> tuple[Path, Outcome]:
    root = fresh(world, "generate-reference")
    return _reference(root, GENERATE, "out")


def test_noise_generate_killed_and_resumed(world, generated, fresh):
    reference_root, reference = generated
    root = fresh(world, "generate-crash")

    def resume() -> list[str]:  # a run killed before its config.yaml cannot be resumed
        runs = _runs(root)
        assert len(runs) <= 1, f"several resumable runs: {runs}"
        return ["noise", "generate", "--resume", str(runs[0].relative_to(root))] if runs \
            else GENERATE

    campaign = _campaign(root, GENERATE, reference, watch="out", keeps_progress=True,
                         resume=resume)
    (ref_run,), (crash_run,) = _runs(reference_root), _runs(root)
    _assert_same(reference_root, root, campaign, {ref_run: "<RUN>", crash_run: "<RUN>"})


@pytest.fixture(scope="module")
def evaluated(generated, fresh) -> tuple[Path, Outcome]:
    root = fresh(generated[0], "eval-reference")
    (run,) = _runs(root)
    return _reference(root, _eval_args(root), str(run.relative_to(root)))


def _eval_args(root: Path) -> list[str]:
    (run,) = _runs(root)
    return ["noise", "eval", "--run-dir", str(run.relative_to(root))]


def test_noise_eval_killed_and_rerun(generated, evaluated, fresh):
    reference_root, reference = evaluated
    root = fresh(generated[0], "eval-crash")
    campaign = _campaign(root, _eval_args(root), reference, watch=_eval_args(root)[-1],
                         keeps_progress=True)
    _assert_same(reference_root, root, campaign)


# ---- capture / extract / steer -----------------------------------------------------------


@pytest.fixture(scope="module")
def responded(world, fresh) -> Path:
    root = fresh(world, "responses")
    run_cli(["responses", "--experiment", "e", "--prompt-set", "crash", "--max-new-tokens",
             "8"], root).check()
    return root


@pytest.fixture(scope="module")
def captured(responded, fresh) -> tuple[Path, Outcome]:
    return _reference(fresh(responded, "capture-reference"), CAPTURE, "experiments")


def test_capture_killed_and_rerun_with_skip_existing(responded, captured, fresh):
    reference_root, reference = captured
    root = fresh(responded, "capture-crash")
    campaign = _campaign(root, CAPTURE, reference, watch="experiments", keeps_progress=True)
    _assert_same(reference_root, root, campaign)


@pytest.fixture(scope="module")
def extracted(world, fresh) -> tuple[Path, Outcome]:
    root = fresh(world, "extract-reference")
    return _reference(root, EXTRACT, "experiments")


def test_extract_killed_and_rerun(world, extracted, fresh):
    reference_root, reference = extracted
    root = fresh(world, "extract-crash")
    campaign = _campaign(root, EXTRACT, reference, watch="experiments", keeps_progress=False)
    _assert_same(reference_root, root, campaign)


def test_steer_killed_and_rerun(extracted, fresh):
    reference_root, reference = _reference(fresh(extracted[0], "steer-reference"), STEER,
                                           "experiments")
    root = fresh(extracted[0], "steer-crash")
    campaign = _campaign(root, STEER, reference, watch="experiments", keeps_progress=False)
    _assert_same(reference_root, root, campaign)


# ---- a kill at the most exposed moment of an atomic write ---------------------------------


def test_capture_killed_before_a_rename_leaves_no_temp_file(responded, captured, fresh):
    """Random kills rarely land between an atomic write's temp file and its rename (for
    real captures of hundreds of MB they often do); this one is placed there on purpose."""
    root = fresh(responded, "capture-rename-kill")
    killed = run_cli(CAPTURE, root, prelude=kill_before_rename(".safetensors", 3))
    assert killed.returncode == -9, f"the kill before the 3rd rename did not happen:\n" \
        f"{killed.output[-2000:]}"
    campaign = Campaign(root, root / "experiments", ["killed before the 3rd capture rename"])
    run_cli(CAPTURE, root).check()
    _assert_same(captured[0], root, campaign)


def test_noise_generate_killed_before_its_config_leaves_no_half_made_run(world, generated,
                                                                         fresh):
    """Killed between its first files and config.yaml, a run cannot be resumed; starting
    again must still end with one run, equal to the uninterrupted one."""
    root = fresh(world, "generate-config-kill")
    killed = run_cli(GENERATE, root, prelude=kill_before_rename("config.yaml", 1))
    assert killed.returncode == -9, f"the kill before config.yaml did not happen:\n" \
        f"{killed.output[-2000:]}"
    campaign = Campaign(root, root / "out", ["killed before the rename onto config.yaml"])
    assert not _runs(root)  # nothing to --resume: the user starts again
    run_cli(GENERATE, root).check()
    (ref_run,), (crash_run,) = _runs(generated[0]), _runs(root)
    _assert_same(generated[0], root, campaign, {ref_run: "<RUN>", crash_run: "<RUN>"})
