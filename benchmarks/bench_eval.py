"""Log-prob evaluation speed and memory on the embedded model, side by side in one run.

1. Throughput: scored tokens/s of ``run_eval``'s scorer vs a plain forward (full logits) over
   the same padded batches. Goal: >= 0.95x.
2. Peak memory above the loaded model: the scorer (LM head on response positions only,
   chunked float32 log-softmax) vs the naive full-vocabulary float32 ``log_softmax`` over the
   whole batch. Each runs in a fresh process; peak RSS (VmHWM, reset after loading) minus
   the RSS before scoring. Linux only. Goal: <= 0.5x.

    python benchmarks/bench_eval.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from residlab.arch import resolve_arch
from residlab.config import NoisingConfig
from residlab.generation import padded_inputs
from residlab.models import load_model
from residlab.noising.eval import _exact_row, read_generations
from residlab.noising.generate import run_generate
from residlab.noising.runs import RunDir
from residlab.scoring import score_rows


def batches_of(run_dir: Path, tokenizer, batch_size: int):
    """The eval's own batches: rows sorted by length, ``batch_size`` at a time."""
    records, _ = read_generations(RunDir(run_dir))
    records.sort(key=lambda r: len(r["prompt_token_ids"]) + len(r["response_token_ids"]))
    stops = set(tokenizer.all_special_ids)
    rows = [_exact_row(r, stops, True)[0] for r in records]
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def ours(loaded, arch, batches) -> None:
    for rows in batches:
        score_rows(loaded.model, arch, rows, pad_id=loaded.tokenizer.pad_token_id)


def plain_forward(loaded, batches) -> None:
    for rows in batches:
        inputs = padded_inputs([r.token_ids for r in rows], loaded.tokenizer.pad_token_id, "cpu")
        with torch.inference_mode():
            loaded.model(**inputs)


def naive(loaded, batches) -> None:
    """Full logits, float32 log_softmax over batch x seq x vocab, then gather."""
    for rows in batches:
        inputs = padded_inputs([r.token_ids for r in rows], loaded.tokenizer.pad_token_id, "cpu")
        with torch.inference_mode():
            logprobs = loaded.model(**inputs).logits.float().log_softmax(dim=-1)  # (B, T, V)
            targets = inputs["input_ids"][:, 1:, None]
            logprobs[:, :-1].gather(2, targets)


def measure_memory(method: str, run_dir: str, dtype: str, batch_size: int) -> None:
    loaded = load_model("default", dtype=dtype, device="cpu")
    arch = resolve_arch(loaded.model)
    batches = batches_of(Path(run_dir), loaded.tokenizer, batch_size)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to current RSS
    base = _status_kib("VmRSS")
    ours(loaded, arch, batches) if method == "ours" else naive(loaded, batches)
    print(json.dumps({"extra_mib": (_status_kib("VmHWM") - base) / 1024}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def memory_in_fresh_process(method: str, run_dir: Path, dtype: str, batch_size: int) -> float:
    done = subprocess.run([sys.executable, __file__, "--memory", method, "--run-dir",
                           str(run_dir), "--dtype", dtype, "--batch-size", str(batch_size)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["extra_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        measure_memory(args.memory, args.run_dir, args.dtype, args.batch_size)
        return
    loaded = load_model("default", dtype=args.dtype, device="cpu")
    arch = resolve_arch(loaded.model)
    with tempfile.TemporaryDirectory() as out:
        cfg = NoisingConfig(model_name="default", dtype=args.dtype, num_prompts=24,
                            batch_size=64, max_new_tokens=96, layer_index=10,
                            noise_norms=[0.0, 64.0], num_noise_vectors=2, seed=0,
                            output_dir=out)
        run_dir = run_generate(cfg, loaded=loaded)
        batches = batches_of(run_dir, loaded.tokenizer, args.batch_size)
        tokens = sum(r.end - r.start for rows in batches for r in rows)
        width = [max(len(r.token_ids) for r in rows) for rows in batches]
        print(f"model: {loaded.provenance['model']}  dtype={loaded.dtype}  "
              f"{sum(map(len, batches))} generations, {tokens} scored tokens, "
              f"{len(batches)} batches of {args.batch_size} "
              f"(padded width {min(width)}-{max(width)})")
        ours(loaded, arch, batches[:1])
        plain_forward(loaded, batches[:1])  # warm-up
        t_ours, t_plain = [], []
        for _ in range(args.repeats):  # interleaved so drift hits both alike
            start = time.perf_counter()
            plain_forward(loaded, batches)
            t_plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            ours(loaded, arch, batches)
            t_ours.append(time.perf_counter() - start)
        plain_rate = tokens / statistics.median(t_plain)
        ours_rate = tokens / statistics.median(t_ours)
        print(f"[speed] plain forward (full logits) : {plain_rate:9.1f} scored tok/s")
        print(f"[speed] residlab eval scorer        : {ours_rate:9.1f} scored tok/s")
        print(f"[speed] ratio eval/plain = {ours_rate / plain_rate:.2f}x   (goal >= 0.95x)")
        mine = memory_in_fresh_process("ours", run_dir, args.dtype, args.batch_size)
        full = memory_in_fresh_process("naive", run_dir, args.dtype, args.batch_size)
        print(f"[memory] naive fp32 log_softmax over batch : {full:8.1f} MiB peak above model")
        print(f"[memory] residlab eval scorer             : {mine:8.1f} MiB peak above model")
        print(f"[memory] ratio eval/naive = {mine / full:.3f}x   (goal <= 0.5x)")


if __name__ == "__main__":
    main()
