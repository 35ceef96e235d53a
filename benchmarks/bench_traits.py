"""Trait-vector stages on the embedded model, measured side by side in one run.

1. Projection: projecting 32 stored captures (every layer, residual + attn, bf16) onto 5 traits
   (with calibration values embedded) vs only reading the same files with ``load_raw``.
   Goal: >= 0.8x of the read speed. The five vectors are random unit vectors stored in the
   extraction layout: speed does not depend on their values.
2. Steering sweep: 4 layers x 5 coefficients over a trait's 10 questions (plus the baseline),
   all rows packed into shared batches vs one generate pass per (layer, coefficient) pair.
   Goal: >= 2x faster. Generation only: judging costs the same either way.

    python benchmarks/bench_traits.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from residlab.experiments import load_experiment, load_variant
from residlab.generation import generate_ids
from residlab.hooks import Add
from residlab.inference.calibrate import run_calibration
from residlab.inference.capture import capture_prompt_set
from residlab.inference.project import project_prompt_set
from residlab.inference.prompt_sets import find_prompt_set
from residlab.inference.raw import load_raw
from residlab.inference.responses import generate_responses
from residlab.prompts import template_ids
from residlab.traits.data import load_trait
from residlab.traits.steer import SteerRow, _answer
from residlab.traits.vectors import TraitVector, save_vector

TRAITS = ["behavioral/refusal", "emotion/optimism", "style/formality", "cognitive/uncertainty",
          "alignment/sycophancy"]
LAYERS = [6, 12, 18, 24]
COEFFICIENTS = [-32.0, -16.0, 8.0, 16.0, 32.0]


def store_vectors(experiment, d_model: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for trait in TRAITS:
        for layer in LAYERS:
            vector = torch.randn(d_model, generator=generator)
            save_vector(experiment, TraitVector(trait, "main", "response[:5]", "residual",
                                                "mean_diff", layer, vector / vector.norm(),
                                                {"effect_size": float(layer), "baseline": 0.0,
                                                 "accuracy": 1.0}))


def bench_projection(experiment, loaded, repeats: int) -> None:
    prompts = []
    for name in ["single_trait", "multi_trait", "real_world", "adversarial"]:
        prompts += [{**item, "id": f"{name}-{item['id']}"}
                    for item in json.loads(find_prompt_set(name).read_text())]
    Path("datasets/inference").mkdir(parents=True)
    Path("datasets/inference/bench32.json").write_text(json.dumps(prompts[:32]))
    generate_responses(experiment, "bench32", max_new_tokens=48, batch_size=16, loaded=loaded)
    capture_prompt_set(experiment, "bench32", loaded=loaded)
    files = sorted(experiment.raw_dir("main", "bench32").glob("*.safetensors"))
    run_calibration(experiment, max_new_tokens=16, loaded=loaded)
    size = sum(p.stat().st_size for p in files) / 2**20

    def read_all():
        for path in files:
            load_raw(path)

    def project_all():
        project_prompt_set(experiment, "bench32", layer=LAYERS[-1])

    read_all()
    project_all()  # warm-up (page cache, imports)
    print(f"[project] {len(files)} capture files, {size:.0f} MiB, {len(TRAITS)} traits "
          "(each file read once for all traits; one JSON written per trait and file)")
    _report("warm page cache", len(files), read_all, project_all, repeats, prepare=None)
    if _drop_caches():
        _report("cold page cache", len(files), read_all, project_all, repeats,
                prepare=_drop_caches)
    else:
        print("[project] cold page cache: skipped (needs root to drop the page cache)")


def _report(label, n_files, read_all, project_all, repeats, prepare) -> None:
    """Interleaved timings of both, medians, and the ratio of their speeds."""
    times: dict[str, list[float]] = {"read": [], "project": []}
    for _ in range(repeats):
        for name, run in (("read", read_all), ("project", project_all)):
            if prepare is not None:
                prepare()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    read_s, project_s = statistics.median(times["read"]), statistics.median(times["project"])
    print(f"[project] {label}: read only (load_raw)   : {n_files / read_s:7.1f} files/s")
    print(f"[project] {label}: project 5 traits+write : {n_files / project_s:7.1f} files/s")
    print(f"[project] {label}: projection / read speed = {read_s / project_s:.2f}x   "
          "(goal >= 0.8x)")


def _drop_caches() -> bool:
    """Evict the page cache so files are read from disk (root only)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def bench_steering(loaded, repeats: int) -> None:
    questions = load_trait("emotion/optimism").questions
    generator = torch.Generator().manual_seed(1)
    units = {layer: torch.nn.functional.normalize(torch.randn(576, generator=generator), dim=0)
             for layer in LAYERS}
    rows = [SteerRow(q, None, 0.0) for q in questions] + [
        SteerRow(q, layer, c) for layer in LAYERS for c in COEFFICIENTS for q in questions]
    prompts = [template_ids(loaded.tokenizer, [{"role": "user", "content": q}])[1]
               for q in questions]

    def packed():
        _answer(loaded, rows, units, max_new_tokens=32, batch_size=64, positions="all")

    def per_pair():
        generate_ids(loaded.model, loaded.tokenizer, prompts, max_new_tokens=32)
        for layer in LAYERS:
            for coefficient in COEFFICIENTS:
                add = Add(layer, units[layer] * coefficient, site="resid_post")
                generate_ids(loaded.model, loaded.tokenizer, prompts, max_new_tokens=32,
                             interventions=[add])

    packed_t, pair_t = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        per_pair()
        pair_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        packed()
        packed_t.append(time.perf_counter() - start)
    p, q = statistics.median(pair_t), statistics.median(packed_t)
    print(f"[steer] {len(LAYERS)} layers x {len(COEFFICIENTS)} coefficients x "
          f"{len(questions)} questions + baseline = {len(rows)} answers, 32 new tokens")
    print(f"[steer] one pass per (layer, coefficient) : {p:7.1f} s")
    print(f"[steer] packed rows (batch 64)            : {q:7.1f} s")
    print(f"[steer] speed-up packed vs per-pair = {p / q:.2f}x   (goal >= 2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["project", "steer"], help="run one part")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="residlab-bench-"))
    os.chdir(root)
    os.environ["RESIDLAB_EXPERIMENTS_DIR"] = str(root)
    try:
        (root / "b").mkdir()
        (root / "b" / "config.yaml").write_text(
            "model_variants:\n  main: {model: default, dtype: bf16, device: cpu}\n"
            "defaults: {application: main, extraction: main}\n")
        experiment = load_experiment("b")
        loaded = load_variant(experiment, "main")
        print(f"model: {loaded.provenance['model']}  dtype={loaded.dtype}")
        store_vectors(experiment, loaded.model.config.hidden_size)
        if args.only != "steer":
            bench_projection(experiment, loaded, repeats=3)
        if args.only != "project":
            bench_steering(loaded, repeats=3)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
