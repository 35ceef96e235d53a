"""The model diff on the embedded model and a LoRA made here: one command vs the seed's steps.

Side by side in one run, on the same prompts and the same responses of the LoRA variant
(generated once, before anything is timed):
  - speed: ``run_diff`` in a fresh process (one load of the base weights, adapter off for A and
    on for B; captures, projections, compare, per-token diff, and also the log-prob diff) vs the
    seed's flow as separate processes: capture B, capture A with ``--responses-from``, project
    B, project A, ``diff compare``, ``diff per-token``. Goal: run_diff >= 1.5x faster.
  - memory: peak RSS (VmHWM) of the ``run_diff`` process vs a process capturing one variant
    (the seed's default components). Goal: <= 1.2x.

    HF_HUB_OFFLINE=1 python benchmarks/bench_diff.py

Torch runs on one thread in every process (``--threads``; children get OMP_NUM_THREADS): on a
shared 2-core machine more threads made timings swing 3-10x from one repeat to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from residlab.experiments import load_experiment, load_variant
from residlab.inference.responses import generate_responses
from residlab.prompts import builtin_conversations, chat_messages
from residlab.traits.vectors import TraitVector, save_vector

PROMPTS = 12
NEW_TOKENS = 48
TRAIT_LAYERS = (6, 12, 18, 24)
A, B, SET = "base", "tuned", "bench"


def setup(root: Path, threads: int) -> None:
    """Two experiments (``seed``, ``one``) with the same variants, vectors and responses."""
    from peft import LoraConfig, get_peft_model

    from residlab.models import load_model

    torch.manual_seed(0)
    model = load_model("default", dtype="fp32", device="cpu").model
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(root / "lora")
    del model
    texts = [m[-1]["content"][:300] for _, c in builtin_conversations()
             if (m := chat_messages(c)) is not None]
    (root / "datasets" / "inference").mkdir(parents=True)
    (root / "datasets" / "inference" / f"{SET}.json").write_text(json.dumps(
        [{"id": str(i), "prompt": text} for i, text in enumerate(texts[:PROMPTS])]))
    cpu = {"model": "default", "dtype": "fp32", "device": "cpu"}
    config_text = json.dumps({"model_variants": {A: cpu, B: {**cpu, "lora": str(root / "lora")}},
                              "defaults": {"application": A, "extraction": A}})
    for name in ("seed", "one"):
        (root / "experiments" / name).mkdir(parents=True)
        (root / "experiments" / name / "config.yaml").write_text(config_text)  # JSON is YAML
        _store_vectors(load_experiment(name))
    seed = load_experiment("seed")
    generate_responses(seed, SET, variant=B, max_new_tokens=NEW_TOKENS,
                       loaded=load_variant(seed, B))
    shutil.copytree(seed.responses_dir(B, SET), load_experiment("one").responses_dir(B, SET))


def _store_vectors(experiment) -> None:
    generator = torch.Generator().manual_seed(1)
    for layer in TRAIT_LAYERS:
        save_vector(experiment, TraitVector(
            "bench/trait", A, "response[:5]", "residual", "mean_diff", layer,
            torch.randn(576, generator=generator),
            {"effect_size": 2.0 if layer == 12 else 1.0, "accuracy": 1.0}))


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads or os.cpu_count()),
            "HF_HUB_OFFLINE": "1", "RESIDLAB_EXPERIMENTS_DIR": "experiments"}


def seed_flow(root: Path, threads: int) -> float:
    """The seed's six steps, each a fresh process; total wall seconds."""
    common = ["--experiment", "seed", "--prompt-set", SET]
    pair = ["--experiment", "seed", "--variant-a", A, "--variant-b", B, "--prompt-set", SET]
    steps = [
        ["capture", *common, "--model-variant", B],
        ["capture", *common, "--model-variant", A, "--responses-from", B],
        ["project", *common, "--model-variant", B, "--no-calibration"],
        ["project", *common, "--model-variant", A, "--no-calibration"],
        ["diff", "compare", *pair, "--use-best-vector"],
        ["diff", "per-token", *pair, "--trait", "all"],
    ]
    start = time.perf_counter()
    for step in steps:
        done = subprocess.run([sys.executable, "-m", "residlab", *step], cwd=root,
                              env=_env(threads), capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"seed step {' '.join(step[:2])} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def child(root: Path, threads: int, what: str) -> dict:
    """A fresh process running ``what`` (run / capture); its wall time and peak RSS."""
    command = [sys.executable, __file__, "--child", what, "--root", str(root),
               "--threads", str(threads)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=_env(threads), capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise SystemExit(f"child {what} failed:\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]),
            "wall": time.perf_counter() - start}


def child_main(what: str) -> None:
    if what == "run":
        from residlab.analysis.model_diff.run import run_diff

        result = run_diff(load_experiment("one"), A, B, SET)
        stages = result.seconds
    else:
        from residlab.inference.capture import capture_prompt_set

        experiment = load_experiment("mem")
        capture_prompt_set(experiment, SET, variant=B)
        stages = {}
    print(json.dumps({"peak": _status("VmHWM"), "stages": stages}))


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(root: Path, threads: int) -> None:
    seed = seed_flow(root, threads)
    one = child(root, threads, "run")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in one["stages"].items())
    print(f"[speed] seed flow (6 processes): {seed:6.1f} s")
    print(f"[speed] run_diff (1 process):    {one['wall']:6.1f} s  ({stages}; includes the "
          "log-prob diff)")
    print(f"[speed] run_diff vs seed flow = {seed / one['wall']:.2f}x faster   (goal >= 1.5x)")
    shutil.copytree(root / "experiments" / "seed", root / "experiments" / "mem")
    shutil.rmtree(root / "experiments" / "mem" / "inference" / B / "raw")
    capture = child(root, threads, "capture")
    print(f"[memory] peak RSS run_diff {one['peak']:.0f} MiB, one variant's capture "
          f"{capture['peak']:.0f} MiB = {one['peak'] / capture['peak']:.2f}x   (goal <= 1.2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0: its default")
    parser.add_argument("--child", choices=["run", "capture"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        os.chdir(args.root)
        child_main(args.child)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_diff_"))
    try:
        os.chdir(root)
        os.environ["RESIDLAB_EXPERIMENTS_DIR"] = "experiments"
        print(f"bench_diff: {PROMPTS} prompts, {NEW_TOKENS} new tokens, embedded model fp32, "
              f"LoRA r=8 on q_proj/v_proj, threads={torch.get_num_threads()}")
        setup(root, args.threads)
        report(root, args.threads)
    finally:
        os.chdir("/")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
