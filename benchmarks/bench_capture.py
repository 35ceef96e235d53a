"""Raw activation capture speed on the embedded model, side by side in one run.

32 prompts with generated responses. For the same left-padded batches:
  - a plain forward (``model(**inputs)``, full logits), nothing saved;
  - residlab capture of every layer's residual, written to disk (one safetensors per prompt);
  - the seed's default (residual + attn_contribution for every layer) with residlab;
  - nnsight saving every layer's output, then written to disk the same way.
Goal: residlab residual capture <= 1.15x the plain forward.

    python benchmarks/bench_capture.py     # needs: pip install 'residlab[bench]' (nnsight)
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
from residlab.generation import padded_inputs
from residlab.inference.capture import capture_prompt_set
from residlab.inference.raw import save_raw, tensor_name
from residlab.inference.responses import generate_responses, read_response
from residlab.prompts import builtin_conversations, chat_messages

N_PROMPTS = 32


def setup(root: Path, dtype: str) -> None:
    """An experiment with one variant and a 32-prompt set from the built-in prompts."""
    (root / "experiments" / "bench").mkdir(parents=True)
    (root / "experiments" / "bench" / "config.yaml").write_text(
        f"model_variants:\n  main: {{model: default, dtype: {dtype}, device: cpu}}\n"
        "defaults: {application: main}\n")
    prompts = []
    for index, conversation in builtin_conversations():
        messages = chat_messages(conversation)
        if messages and len(messages[-1]["content"]) < 400:
            prompts.append({"id": str(index), "prompt": messages[-1]["content"]})
        if len(prompts) == N_PROMPTS:
            break
    (root / "datasets" / "inference").mkdir(parents=True)
    (root / "datasets" / "inference" / "bench32.json").write_text(json.dumps(prompts))


def batches(experiment, batch_size: int) -> list[list[dict]]:
    paths = sorted(experiment.responses_dir("main", "bench32").glob("*.json"))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="residlab-bench-"))
    os.chdir(root)
    os.environ["RESIDLAB_EXPERIMENTS_DIR"] = str(root / "experiments")
    try:
        setup(root, args.dtype)
        experiment = load_experiment("bench")
        loaded = load_variant(experiment, "main")
        generate_responses(experiment, "bench32", max_new_tokens=64, batch_size=16,
                           loaded=loaded)
        groups = batches(experiment, args.batch_size)
        tokens = sum(len(r["token_ids"]) for g in groups for r in g)
        layers = loaded.model.config.num_hidden_layers
        print(f"model: {loaded.provenance['model']}  dtype={loaded.dtype}  {N_PROMPTS} prompts, "
              f"{tokens} tokens, {len(groups)} batches of {args.batch_size}, {layers} layers")
        try:
            from nnsight import LanguageModel

            lm = LanguageModel(loaded.model, tokenizer=loaded.tokenizer)
        except ImportError:
            lm = None
            print("nnsight not installed: pip install 'residlab[bench]' to compare with it")

        def ours(components):
            def run():
                capture_prompt_set(experiment, "bench32", loaded=loaded, components=components,
                                   batch_size=args.batch_size)
            return run

        methods = {"plain forward (no saving)": lambda: plain(loaded, groups),
                   "residlab: residual, all layers": ours(["residual"]),
                   "residlab: residual + attn (seed default)": ours(None)}
        if lm is not None:
            nn_dir = root / "nnsight"
            methods["nnsight: layer outputs, all layers"] = (
                lambda: with_nnsight(lm, loaded, groups, nn_dir))
        for run in methods.values():  # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.repeats):  # interleaved so drift hits all alike
            for name, run in methods.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["plain forward (no saving)"])
        for name, values in times.items():
            t = statistics.median(values)
            print(f"[capture] {name:42s} {t:7.2f} s   {t / base:5.2f}x plain   "
                  f"{tokens / t:8.0f} tok/s")
        ours_t = statistics.median(times["residlab: residual, all layers"])
        print(f"[capture] residlab residual capture vs plain forward = {ours_t / base:.2f}x   "
              f"(goal <= 1.15x)")
        if lm is not None:
            nn_t = statistics.median(times["nnsight: layer outputs, all layers"])
            print(f"[capture] residlab vs nnsight (same layers, same files) = "
                  f"{nn_t / ours_t:.2f}x faster")
        sizes = sum(p.stat().st_size for p in
                    experiment.raw_dir("main", "bench32").glob("*.safetensors"))
        print(f"[capture] on disk (seed default, bf16): {sizes / 2**20:.1f} MiB for "
              f"{N_PROMPTS} prompts")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
