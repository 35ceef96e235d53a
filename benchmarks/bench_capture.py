"""Raw activation capture on the embedded model: memory and speed, side by side in one run.

Prompts are the built-in chat prompts followed by real text as the response (no generation),
from 64 to 192 tokens; every set spans the same lengths, so only the number of prompts varies.
  - memory: peak RSS (VmHWM) of a fresh process capturing every layer's residual, attention
    and MLP contributions (the heaviest request) for 10 and for 80 prompts at the default batch.
    Goal: 80 prompts <= 1.15x the peak of 10 prompts.
  - speed, for the same 24 prompts: a plain forward (``model(**inputs)``, full logits, nothing
    saved); residlab capture of every layer's residual; the seed's default (residual +
    attn_contribution); every component at the chosen default batch and at batch 1 (goal:
    default >= 1x the throughput of batch 1, here and on 32 short prompts of 16-48 tokens);
    nnsight saving every layer's output, if installed.
    Goal: residlab residual capture <= 1.15x the plain forward.

    HF_HUB_OFFLINE=1 python benchmarks/bench_capture.py   # nnsight: pip install 'residlab[bench]'

Torch runs on one thread unless ``--threads`` says otherwise: on a shared 2-core machine two
threads made the same run 3-10x slower from one repeat to the next, which drowns the ratios.
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

from residlab.arch import resolve_arch
from residlab.experiments import load_experiment, load_variant
from residlab.generation import padded_inputs
from residlab.inference.capture import capture_prompt_set, default_batch_size
from residlab.inference.raw import save_raw, tensor_name
from residlab.inference.responses import read_response
from residlab.prompts import builtin_conversations, chat_messages, template_ids

SPEED_PROMPTS = 24
SHORT_PROMPTS = 32  # of 16-48 tokens: where batching pays on CPU
MEMORY_PROMPTS = (10, 80)
SHORTEST, LONGEST = 64, 192


def setup(root: Path, dtype: str) -> None:
    """An experiment with one variant on CPU."""
    (root / "experiments" / "bench").mkdir(parents=True)
    (root / "experiments" / "bench" / "config.yaml").write_text(
        f"model_variants:\n  main: {{model: default, dtype: {dtype}, device: cpu}}\n"
        "defaults: {application: main}\n")


def write_responses(experiment, tokenizer, name: str, n: int,
                    lengths: tuple[int, int] = (SHORTEST, LONGEST)) -> None:
    """``n`` response JSONs whose lengths run evenly over ``lengths`` (tokens, inclusive): a
    built-in prompt, then the following prompts' text as the response."""
    shortest, longest = lengths
    texts = [m[-1]["content"] for _, c in builtin_conversations()
             if (m := chat_messages(c)) is not None]
    filler = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
    out = experiment.responses_dir("main", name)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        length = shortest + round(i * (longest - shortest) / max(n - 1, 1))
        prompt = template_ids(tokenizer, [{"role": "user", "content": texts[i % 40][:200]}])[1]
        prompt = prompt[: length // 2]
        start = (i * 97) % (len(filler) - length)
        ids = prompt + filler[start:start + length - len(prompt)]
        (out / f"{i:03d}.json").write_text(json.dumps({
            "prompt": tokenizer.decode(prompt), "response": tokenizer.decode(ids[len(prompt):]),
            "token_ids": ids, "prompt_end": len(prompt)}))


def peak_rss_child(root: Path, n: int) -> None:
    """In a fresh process: capture the ``n``-prompt set, print baseline and peak RSS (MiB)."""
    experiment = load_experiment("bench")
    loaded = load_variant(experiment, "main")
    arch = resolve_arch(loaded.model)
    batch, _ = default_batch_size(loaded.model, arch, tokens=LONGEST, captured=3 * arch.n_layers,
                                  limit=n)
    with torch.inference_mode():  # page the weights in, so the baseline holds them
        arch.body(input_ids=torch.tensor([[1, 2, 3, 4]]))
    before = _status("VmRSS")
    start = time.perf_counter()
    capture_prompt_set(experiment, f"mem{n}", loaded=loaded, capture_mlp=True)
    print(json.dumps({"before": before, "peak": _status("VmHWM"), "batch": batch,
                      "seconds": time.perf_counter() - start}))


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(root: Path, threads: int) -> None:
    peaks = {}
    for n in MEMORY_PROMPTS:
        command = [sys.executable, __file__, "--child-rss", str(n), "--root", str(root),
                   "--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"child for {n} prompts failed:\n{done.stderr[-2000:]}")
        peaks[n] = json.loads(done.stdout.strip().splitlines()[-1])
        p = peaks[n]
        print(f"[memory] {n:3d} prompts: peak RSS {p['peak']:6.0f} MiB (model loaded and run: "
              f"{p['before']:.0f} MiB; capture +{p['peak'] - p['before']:.0f} MiB) "
              f"at default batch {p['batch']}, {p['seconds']:.1f} s")
    few, many = (peaks[n]["peak"] for n in MEMORY_PROMPTS)
    print(f"[memory] peak RSS {MEMORY_PROMPTS[1]} vs {MEMORY_PROMPTS[0]} prompts = "
          f"{many / few:.2f}x   (goal <= 1.15x)")


def batches(experiment, batch_size: int) -> list[list[dict]]:
    paths = sorted(experiment.responses_dir("main", "speed").glob("*.json"))
    records = sorted((read_response(p) | {"id": p.stem} for p in paths),
                     key=lambda r: len(r["token_ids"]))
    return [records[i:i + batch_size] for i in range(0, len(records), batch_size)]


def plain(loaded, groups) -> None:
    for group in groups:
        inputs = padded_inputs([r["token_ids"] for r in group], loaded.tokenizer.pad_token_id,
                               "cpu")
        with torch.inference_mode():
            loaded.model(**inputs)


def with_nnsight(lm, loaded, groups, out_dir: Path) -> None:
    n_layers = loaded.model.config.num_hidden_layers
    for group in groups:
        inputs = padded_inputs([r["token_ids"] for r in group], loaded.tokenizer.pad_token_id,
                               "cpu")
        saved = []
        with torch.inference_mode(), lm.trace(dict(inputs)):
            for layer in range(n_layers):
                saved.append(lm.model.layers[layer].output.save())
        width = inputs["input_ids"].shape[1]
        for row, record in enumerate(group):
            start, end = width - len(record["token_ids"]), record["prompt_end"]
            tensors = {}
            for layer, value in enumerate(saved):
                hidden = value[0] if isinstance(value, tuple) else value
                values = hidden[row, start:]
                tensors[tensor_name("prompt", layer, "residual")] = values[:end].clone()
                tensors[tensor_name("response", layer, "residual")] = values[end:].clone()
            save_raw(out_dir / f"{record['id']}.safetensors", tensors, {"id": record["id"]})


def methods(experiment, loaded, root: Path) -> tuple[dict, int]:
    """What the speed part runs, by name; and the batch the plain forward uses (the default
    batch of the residual capture, so both run the same batches)."""
    arch = resolve_arch(loaded.model)
    batch, why = default_batch_size(loaded.model, arch, tokens=LONGEST, captured=arch.n_layers,
                                    limit=SPEED_PROMPTS)
    print(f"default batch for the residual capture: {batch}, {why}")
    groups = batches(experiment, batch)

    def ours(components, batch_size=None):
        return lambda: capture_prompt_set(experiment, "speed", loaded=loaded,
                                          components=components, batch_size=batch_size)

    every = ["residual", "attn_contribution", "mlp_contribution"]
    runs = {"plain forward (no saving)": lambda: plain(loaded, groups),
            "residlab: residual, all layers": ours(["residual"]),
            "residlab: residual + attn (seed default)": ours(None),
            "residlab: all components, default batch": ours(every),
            "residlab: all components, batch 1": ours(every, 1)}
    try:
        from nnsight import LanguageModel

        lm = LanguageModel(loaded.model, tokenizer=loaded.tokenizer)
        runs["nnsight: layer outputs, all layers"] = (
            lambda: with_nnsight(lm, loaded, groups, root / "nnsight"))
    except ImportError:
        print("nnsight not installed (pip install 'residlab[bench]'): its row is skipped")
    return runs, batch


def timed(runs: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each run over ``repeats`` rounds, interleaved so drift hits all
    alike; the best is the least disturbed repeat on a shared machine."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def speed(experiment, loaded, root: Path, repeats: int) -> None:
    runs, batch = methods(experiment, loaded, root)
    tokens = sum(len(r["token_ids"]) for g in batches(experiment, batch) for r in g)
    print(f"{SPEED_PROMPTS} prompts, {tokens} tokens, "
          f"{loaded.model.config.num_hidden_layers} layers")
    plain(loaded, batches(experiment, batch)[:1])  # warm-up, short
    capture_prompt_set(experiment, "warm", loaded=loaded, capture_mlp=True)
    if "nnsight: layer outputs, all layers" in runs:
        runs["nnsight: layer outputs, all layers"]()
    best = timed(runs, repeats)
    base = best["plain forward (no saving)"]
    for name, t in best.items():
        print(f"[capture] {name:42s} {t:7.2f} s   {t / base:5.2f}x plain   "
              f"{tokens / t:8.0f} tok/s")
    ours = best["residlab: residual, all layers"]
    print(f"[capture] residlab residual capture vs plain forward = {ours / base:.2f}x   "
          f"(goal <= 1.15x)")
    ratio = best["residlab: all components, batch 1"] / best[
        "residlab: all components, default batch"]
    print(f"[capture] throughput at the default batch vs --batch-size 1 = {ratio:.2f}x   "
          f"(goal >= 1x)")
    if "nnsight: layer outputs, all layers" in best:
        print(f"[capture] residlab vs nnsight (same layers, same files) = "
              f"{best['nnsight: layer outputs, all layers'] / ours:.2f}x faster")
    sizes = sum(p.stat().st_size for p in
                experiment.raw_dir("main", "speed").glob("*.safetensors"))
    print(f"[capture] on disk (all components, bf16): {sizes / 2**20:.1f} MiB for "
          f"{SPEED_PROMPTS} prompts")


def short_speed(experiment, loaded, repeats: int) -> None:
    """Default batch vs batch 1 on short prompts, where batching pays on CPU."""
    def every(batch_size):
        return lambda: capture_prompt_set(experiment, "short", loaded=loaded, capture_mlp=True,
                                          batch_size=batch_size)

    best = timed({"default": every(None), "batch 1": every(1)}, repeats)
    print(f"[capture] {SHORT_PROMPTS} prompts of 16-48 tokens, all components: default batch "
          f"{best['default']:.2f} s, batch 1 {best['batch 1']:.2f} s = "
          f"{best['batch 1'] / best['default']:.2f}x   (goal >= 1x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp32", help="model dtype of the variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0: its default")
    parser.add_argument("--child-rss", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_rss:
        os.environ["RESIDLAB_EXPERIMENTS_DIR"] = str(args.root / "experiments")
        return peak_rss_child(args.root, args.child_rss)
    root = Path(tempfile.mkdtemp(prefix="residlab-bench-"))
    os.environ["RESIDLAB_EXPERIMENTS_DIR"] = str(root / "experiments")
    try:
        setup(root, args.dtype)
        experiment = load_experiment("bench")
        loaded = load_variant(experiment, "main")
        sets = [("speed", SPEED_PROMPTS), ("warm", 4), *((f"mem{n}", n) for n in MEMORY_PROMPTS)]
        for name, n in sets:
            write_responses(experiment, loaded.tokenizer, name, n)
        write_responses(experiment, loaded.tokenizer, "short", SHORT_PROMPTS, (16, 48))
        print(f"model: {loaded.provenance['model']}  dtype={loaded.dtype}  "
              f"threads={torch.get_num_threads()}  prompts of {SHORTEST}-{LONGEST} tokens")
        memory(root, args.threads)
        speed(experiment, loaded, root, args.repeats)
        short_speed(experiment, loaded, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
