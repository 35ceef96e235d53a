"""A small experiment made on the embedded model for the dashboard's tests and benchmark.

``build_dashboard_experiment(root, loaded)`` writes ``root/experiments/demo`` with:

- variants ``base`` (the embedded model, fp32 CPU) and ``tuned`` (+ a random rank-4 LoRA);
- prompt set ``hostile`` (3 prompts whose text, note and tags carry markup that must stay
  inert), responses of ``tuned`` (8 new tokens) also used for ``base`` (the model diff);
- one extracted trait (``emotion/optimism``, mean_diff + probe at layers 12 and 18) and a
  stored vector for a trait whose folder name is markup (``hostile/<img ...>``);
- captures of both variants at layers 12, 18, a calibration of ``base``, projections of both
  variants onto both traits at their best layer and (optimism) at layers 12 and 18;
- the model diff of base vs tuned (``diff run``: results, per-token deltas, log-probs);
- logit lens (top 5) and attention at layers 12 and 18 for the first prompt (``tuned``);
- a steering run of ``emotion/optimism`` (the trait is a local copy of the shipped one with 3
  steering questions and markup in its definition): baseline + layers 12, 18 x coefficients
  20, 80, judged by the local judge; the vector logit lens of both traits;
- a noising run under ``root/noising/outputs`` (2 prompts x 2 vectors x scales 0, 64; 4 new
  tokens), evaluated, with its ``viz.html``.

Building takes about a minute; the tests build it once per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

EVIL_TEXT = "<img src=x onerror=window.__xss=1>"
EVIL_SCRIPT = "<script>window.__xss=2</script>"
EVIL_TRAIT = "hostile/<img src=x onerror=window.__xss=3>"
PROMPTS = [
    {"id": "p1", "prompt": f"Say something hopeful about {EVIL_TEXT} tomorrow.",
     "note": f"note with {EVIL_SCRIPT}"},
    {"id": "p2", "prompt": f"Describe rain. {EVIL_SCRIPT}", "note": "plain note"},
    {"id": "p3", "prompt": "What is two plus two?"},
]
LAYERS = (12, 18)
EVIL_DEFINITION = f"Trait: optimism {EVIL_SCRIPT}\nScoring: 0 = gloomy, 100 = hopeful.\n"
NOISING_CONFIG = """model_name: default
dtype: fp32
num_prompts: 2
max_prompt_len: 128
batch_size: 8
max_new_tokens: 4
layer_index: 10
noise_norms: [0.0, 64.0]
num_noise_vectors: 2
seed: 0
output_dir: noising/outputs
"""


def _local_trait(root: Path) -> None:
    """``datasets/traits/emotion/optimism``: 12 of the shipped pairs, 3 steering questions and a
    definition carrying markup (a user's trait folder wins over the shipped one)."""
    from importlib import resources

    shipped = Path(str(resources.files("residlab").joinpath("data/traits/emotion/optimism")))
    folder = root / "datasets" / "traits" / "emotion" / "optimism"
    folder.mkdir(parents=True)
    for name in ("positive.txt", "negative.txt"):  # 12 pairs: a direction, quickly
        lines = (shipped / name).read_text().splitlines(keepends=True)
        (folder / name).write_text("".join(lines[:12]))
    questions = json.loads((shipped / "steering.json").read_text())["questions"][:2]
    (folder / "steering.json").write_text(json.dumps(
        {"questions": [*questions, f"Is {EVIL_TEXT} a good sign?"]}))
    (folder / "definition.txt").write_text(EVIL_DEFINITION)


def _noising_run(root: Path) -> Path:
    from residlab.cli import main

    (root / "noise.yaml").write_text(NOISING_CONFIG)
    assert main(["noise", "generate", "--config", "noise.yaml"]) == 0
    (run,) = sorted((root / "noising" / "outputs").iterdir())
    for command in ("eval", "viz"):
        assert main(["noise", command, "--config", "noise.yaml", "--run_dir", str(run)]) == 0
    return run


def build_dashboard_experiment(root: Path, loaded) -> Path:
    """Write the experiment under ``root/experiments`` (cwd and env must point there:
    ``RESIDLAB_EXPERIMENTS_DIR=root/experiments``, cwd ``root``); return its folder."""
    from peft import LoraConfig, get_peft_model

    from residlab.analysis.model_diff.run import run_diff
    from residlab.experiments import load_experiment
    from residlab.inference.calibrate import run_calibration
    from residlab.inference.extract_viz import extract_viz
    from residlab.inference.project import project_prompt_set
    from residlab.inference.vector_lens import vector_logit_lens
    from residlab.models import load_model
    from residlab.traits.extract import extract_trait
    from residlab.traits.judge import LocalJudge
    from residlab.traits.steer import run_steering
    from residlab.traits.vectors import TraitVector, save_vector

    torch.manual_seed(5)
    fresh = load_model("default", dtype="fp32", device="cpu").model
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    get_peft_model(fresh, lora).save_pretrained(root / "lora")
    del fresh
    cpu = {"model": "default", "dtype": "fp32", "device": "cpu"}
    folder = root / "experiments" / "demo"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_variants": {"base": cpu, "tuned": {**cpu, "lora": str(root / "lora")}},
        "defaults": {"application": "base", "extraction": "base"}}))
    sets = root / "datasets" / "inference"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "hostile.json").write_text(json.dumps(PROMPTS))
    (sets / "calibration.json").write_text(json.dumps(
        [{"id": str(i), "prompt": p} for i, p in enumerate(
            ["Tell me about the sea.", "Write a short greeting.", "Name three fruits."])]))
    experiment = load_experiment("demo")
    _local_trait(root)

    extract_trait(experiment, "emotion/optimism", layers=",".join(map(str, LAYERS)),
                  methods=["mean_diff", "probe"], max_new_tokens=8, loaded=loaded)
    generator = torch.Generator().manual_seed(3)
    save_vector(experiment, TraitVector(EVIL_TRAIT, "base", "response[:5]", "residual",
                                        "mean_diff", LAYERS[0],
                                        torch.randn(576, generator=generator),
                                        {"effect_size": 1.0, "accuracy": 0.9}))
    run_calibration(experiment, variant="base", max_new_tokens=8, loaded=loaded)
    run_calibration(experiment, variant="tuned", max_new_tokens=8)
    run_diff(experiment, "base", "tuned", "hostile", max_new_tokens=8,
             layers=",".join(map(str, LAYERS)))
    for variant in ("base", "tuned"):
        project_prompt_set(experiment, "hostile", variant=variant, layer=",".join(
            map(str, LAYERS)), traits=["emotion/optimism"])
    extract_viz(experiment, "hostile", variant="tuned", attention=True, logit_lens=True,
                layers=",".join(map(str, LAYERS)), top_k=5, limit=1)
    run_steering(experiment, "emotion/optimism", layers=list(LAYERS), coefficients=[20, 80],
                 judge=LocalJudge(loaded), max_new_tokens=8, loaded=loaded)
    vector_logit_lens(experiment, loaded=loaded)
    _noising_run(root)
    return folder


if __name__ == "__main__":  # python tests/dashboard_fixture.py OUT: build one to look at
    import os
    import sys

    from residlab.models import load_model

    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    os.environ["RESIDLAB_EXPERIMENTS_DIR"] = str(out / "experiments")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(build_dashboard_experiment(out, load_model("default", dtype="fp32", device="cpu")))
