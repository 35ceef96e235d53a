"""extract-viz on the embedded model: speed and attention file size, side by side in one run.

16 prompts (a built-in chat prompt followed by real text as the response, 48-112 tokens):
  - speed: ``extract_viz(--attention --logit-lens)`` (all layers, top-k 50, files written) vs a
    plain eager forward with ``output_attentions=True`` and ``output_hidden_states=True`` over
    the same prompts, one at a time, nothing saved. Goal: >= 0.8x its speed. Also printed: the
    same forward plus the logit lens done by hand from its hidden states (final norm + LM head
    + softmax + top-k per layer, float32), which is the work the command does beyond a forward,
    and the arithmetic behind the gap: per token, the lens multiplies by the unembedding once
    per row (31 rows on a 30-layer model), several times the multiply-adds of a whole forward,
    so no run that computes it can reach 0.8x a forward's speed on a machine bound by
    arithmetic.
  - size: the attention safetensors (float16, ``(L, H, T, T)``) vs the seed's JSON shape for
    the same content (per token, per layer, one row per head over the visible keys, values as
    ``json.dump`` writes float32 weights). Goal: <= 0.25x.

    HF_HUB_OFFLINE=1 python benchmarks/bench_viz.py

Torch runs on one thread unless ``--threads`` says otherwise (a shared 2-core machine makes two
threads erratic from one repeat to the next).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from residlab.experiments import load_experiment, load_variant
from residlab.inference.attention import eager_attention
from residlab.inference.extract_viz import extract_viz, viz_dir
from residlab.prompts import builtin_conversations, chat_messages, template_ids

PROMPTS = 16
SHORTEST, LONGEST = 48, 112
TOP_K = 50


def setup(root: Path) -> None:
    (root / "experiments" / "bench").mkdir(parents=True)
    (root / "experiments" / "bench" / "config.yaml").write_text(
        "model_variants:\n  main: {model: default, dtype: fp32, device: cpu}\n"
        "defaults: {application: main}\n")


def write_responses(experiment, tokenizer) -> list[list[int]]:
    """``PROMPTS`` response JSONs whose lengths run evenly over SHORTEST..LONGEST tokens."""
    texts = [m[-1]["content"] for _, c in builtin_conversations()
             if (m := chat_messages(c)) is not None]
    filler = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
    out = experiment.responses_dir("main", "viz")
    out.mkdir(parents=True)
    rows = []
    for i in range(PROMPTS):
        length = SHORTEST + round(i * (LONGEST - SHORTEST) / (PROMPTS - 1))
        prompt = template_ids(tokenizer, [{"role": "user", "content": texts[i][:160]}])[1]
        prompt = prompt[: length // 2]
        start = (i * 97) % (len(filler) - length)
        ids = prompt + filler[start:start + length - len(prompt)]
        (out / f"{i:02d}.json").write_text(json.dumps({"token_ids": ids,
                                                       "prompt_end": len(prompt)}))
        rows.append(ids)
    return rows


def plain_eager(model, rows, *, lens: bool) -> None:
    """The baseline: one eager forward per prompt with attentions and hidden states; with
    ``lens``, the lens by hand from those hidden states."""
    with torch.inference_mode():
        for ids in rows:
            out = model(input_ids=torch.tensor([ids]), output_attentions=True,
                        output_hidden_states=True)
            if lens:
                actual = torch.tensor(ids[1:])
                for hidden in out.hidden_states:  # (1, T, D) each
                    normed = hidden[0, :-1] if hidden is out.hidden_states[-1] \
                        else model.model.norm(hidden[0, :-1])
                    probs = model.lm_head(normed).float().softmax(-1)  # (T-1, V)
                    probs.topk(TOP_K, dim=-1)
                    own = probs.gather(1, actual[:, None])
                    (probs > own).sum(-1)


def flops_per_token(model) -> tuple[float, float]:
    """Multiply-adds x 2 per position: a forward (every weight matrix of the blocks and the
    unembedding once; attention scores are small at these lengths) and the lens (the
    unembedding once per row: the embedding row and every layer)."""
    vocab, width = model.get_output_embeddings().weight.shape
    blocks = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    unembed = vocab * width
    rows = model.config.num_hidden_layers + 1
    return 2.0 * (blocks + unembed), 2.0 * rows * unembed


def timed(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each run, interleaved so machine drift hits all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def seed_json_bytes(path: Path) -> int:
    """The seed's attention JSON for what one safetensors file holds, as json.dump wrote it
    (float32 weights turned into Python floats)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        weights = handle.get_tensor("attention").float()  # (L, H, T, T)
        meta = handle.metadata()
    document = {"prompt_id": path.stem, "n_layers": weights.shape[0],
                "n_heads": weights.shape[1], "tokens": json.loads(meta["tokens"]),
                "attention": [{"token_idx": i, "context_size": i + 1,
                               "by_layer": weights[:, :, i, :i + 1].tolist()}
                              for i in range(weights.shape[-1])]}
    return len(json.dumps(document).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0: its default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        setup(root)
        experiment = load_experiment("bench", root / "experiments")
        loaded = load_variant(experiment, "main")
        rows = write_responses(experiment, loaded.tokenizer)
        n_tokens = sum(map(len, rows))
        print(f"model: {loaded.provenance['model']}  dtype={loaded.dtype}  "
              f"threads={torch.get_num_threads()}  {PROMPTS} prompts, {n_tokens} tokens, "
              f"{loaded.model.config.num_hidden_layers} layers, top-k {TOP_K}")

        def ours():
            extract_viz(experiment, "viz", attention=True, logit_lens=True, top_k=TOP_K,
                        loaded=loaded)

        def baseline(lens: bool):
            with eager_attention(loaded.model):
                plain_eager(loaded.model, rows, lens=lens)

        ours()  # warm-up (and the files measured below)
        seconds = timed({"plain": lambda: baseline(False), "plain+lens": lambda: baseline(True),
                         "ours": ours}, args.repeats)
        p, pl, o = seconds["plain"], seconds["plain+lens"], seconds["ours"]
        print(f"[speed] plain eager forward, attentions + hidden states  {p:7.2f} s  "
              f"{n_tokens / p:7.0f} tok/s")
        print(f"[speed] same + logit lens by hand from hidden states     {pl:7.2f} s  "
              f"{n_tokens / pl:7.0f} tok/s")
        print(f"[speed] extract-viz --attention --logit-lens (files)     {o:7.2f} s  "
              f"{n_tokens / o:7.0f} tok/s")
        print(f"[speed] extract-viz vs plain eager forward = {p / o:.2f}x   (goal >= 0.8x)")
        print(f"[speed] extract-viz vs forward + lens by hand = {pl / o:.2f}x")
        forward, lens = flops_per_token(loaded.model)
        print(f"[arithmetic] per token: forward ~{forward / 1e6:.0f} MFLOP (2 x weights); lens "
              f"{lens / 1e6:.0f} MFLOP ({loaded.model.config.num_hidden_layers + 1} rows x 2 x "
              f"vocab x width); so any run that also computes the lens is at most "
              f"{forward / (forward + lens):.2f}x a forward's speed")
        folder = viz_dir(experiment, "main", "viz")
        ours_bytes = sum(p.stat().st_size for p in folder.glob("*_attention.safetensors"))
        seed_bytes = sum(seed_json_bytes(p) for p in folder.glob("*_attention.safetensors"))
        lens_bytes = sum(p.stat().st_size for p in folder.glob("*_logit_lens.json"))
        print(f"[size] attention safetensors {ours_bytes / 2**20:8.1f} MiB   seed JSON shape "
              f"{seed_bytes / 2**20:8.1f} MiB   = {ours_bytes / seed_bytes:.3f}x   "
              "(goal <= 0.25x)")
        print(f"[size] logit lens JSON {lens_bytes / 2**20:.1f} MiB for {PROMPTS} prompts")


if __name__ == "__main__":
    main()
