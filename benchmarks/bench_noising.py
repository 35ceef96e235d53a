"""Noising runner speed on the embedded model, measured side by side in one run.

1. Hook overhead: tokens/s of generation with a noise vector hooked in vs plain
   ``model.generate`` on the same batches (both generate exactly ``--new-tokens`` tokens).
   Goal: >= 0.97x.
2. Sweep: 8 vectors x 4 scales x 16 prompts, the packed runner (``run_generate``, all rows in
   the batch dimension, files written) vs one pass over the prompts per (vector, scale) pair as
   the seed does. Goal: >= 2x faster. Both produce the same generations (checked).

    python benchmarks/bench_noising.py            # or: make bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig

from residlab.config import NoisingConfig
from residlab.generation import generate_ids, left_pad
from residlab.hooks import Add, intervene
from residlab.models import load_model
from residlab.noising.generate import load_run_prompts, run_generate
from residlab.noising.noise import noise_vectors
from residlab.noising.runs import RunDir


def hook_overhead(loaded, prompts, *, batch: int, new_tokens: int, repeats: int) -> None:
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    batches = [left_pad([p.token_ids for p in prompts[i:i + batch]], pad, loaded.device)
               for i in range(0, len(prompts), batch)]
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=pad, eos_token_id=None)
    vector = torch.tensor(noise_vectors(0, 1, model.config.hidden_size)[0] * 8.0,
                          dtype=torch.float32)

    def run(hooked: bool) -> float:
        start = time.perf_counter()
        for input_ids, mask in batches:
            interventions = [Add(10, vector)] if hooked else []
            with torch.inference_mode(), intervene(model, interventions, prompt_mask=mask):
                model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        return sum(len(ids) for ids, _ in batches) * new_tokens / (time.perf_counter() - start)

    run(False)  # warm-up
    plain, hooked = [], []
    for _ in range(repeats):  # interleaved so drift hits both alike
        plain.append(run(False))
        hooked.append(run(True))
    p, h = statistics.median(plain), statistics.median(hooked)
    print(f"[hooks] {len(batches)} batches x {batch} prompts x {new_tokens} new tokens, "
          f"median of {repeats}")
    print(f"[hooks] plain generate  : {p:8.1f} tok/s")
    print(f"[hooks] hooked generate : {h:8.1f} tok/s")
    print(f"[hooks] ratio hooked/plain = {h / p:.3f}x   (goal >= 0.97x)")


def per_pair(loaded, cfg: NoisingConfig, prompts, noises) -> dict:
    """The seed's loop: for each (vector, scale), every prompt batch with one vector."""
    results = {}
    for noise_id, unit in enumerate(noises):
        for scale in cfg.scales:
            vector = torch.tensor(unit * scale, dtype=torch.float32)
            for start in range(0, len(prompts), cfg.batch_size):
                chunk = prompts[start:start + cfg.batch_size]
                outs = generate_ids(loaded.model, loaded.tokenizer, [p.token_ids for p in chunk],
                                    max_new_tokens=cfg.max_new_tokens,
                                    interventions=[Add(cfg.layer_index, vector)])
                for prompt, out in zip(chunk, outs, strict=True):
                    results[noise_id, scale, prompt.index] = out.token_ids
    return results


def sweep(loaded, cfg: NoisingConfig) -> None:
    prompts = load_run_prompts(cfg, loaded.tokenizer)
    noises = noise_vectors(cfg.seed, cfg.num_noise_vectors, loaded.model.config.hidden_size)
    rows = len(prompts) * len(noises) * len(cfg.scales)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_dir = run_generate(cfg.model_copy(update={"output_dir": out}), loaded=loaded)
        packed_s = time.perf_counter() - start
        packed = {}
        for path in RunDir(run_dir).gens_files():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                packed[r["noise_id"], r["noise_scale"], r["prompt_index"]] = r["response_token_ids"]
    start = time.perf_counter()
    seed_style = per_pair(loaded, cfg, prompts, noises)
    pair_s = time.perf_counter() - start
    same = sum(packed[key] == seed_style[key] for key in seed_style)
    print(f"[sweep] {len(noises)} vectors x {len(cfg.scales)} scales x {len(prompts)} prompts "
          f"= {rows} generations, max_new_tokens={cfg.max_new_tokens}, "
          f"batch_size={cfg.batch_size}, dtype={cfg.dtype}")
    print(f"[sweep] one pass per (vector, scale) pair : {pair_s:7.1f} s")
    print(f"[sweep] packed runner                   : {packed_s:7.1f} s")
    print(f"[sweep] speed-up packed vs per-pair = {pair_s / packed_s:.2f}x   (goal >= 2x)")
    print(f"[sweep] same tokens as per-pair: {same}/{len(seed_style)} "
          "(bf16 results depend on batch shape; fp32 runs agree, see tests)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7,
                        help="interleaved runs per side (run-to-run spread here is ~15%%)")
    parser.add_argument("--skip-hooks", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    loaded = load_model("default", dtype=args.dtype, device="cpu")
    print(f"model: {loaded.provenance['model']}  dtype={loaded.dtype}  "
          f"threads={torch.get_num_threads()}")
    cfg = NoisingConfig(model_name="default", dtype=args.dtype, num_prompts=16, batch_size=64,
                        max_new_tokens=48, layer_index=10, noise_norms=[0.0, 4.0, 8.0, 16.0],
                        num_noise_vectors=8, seed=0, output_dir=str(Path(tempfile.gettempdir())))
    if not args.skip_hooks:
        prompts = load_run_prompts(cfg.model_copy(update={"num_prompts": 48}), loaded.tokenizer)
        hook_overhead(loaded, prompts, batch=16, new_tokens=args.new_tokens, repeats=args.repeats)
    if not args.skip_sweep:
        sweep(loaded, cfg)


if __name__ == "__main__":
    main()
