"""Live Chat on the embedded model (fp32, CPU): stream speed and time to first token.

Both measured in one run, through a real uvicorn server on a loopback port and a streaming
HTTP client, with readouts on 5 traits (random unit vectors saved as traits of a temporary
experiment, at layers spread through the model):
  - throughput: streamed generation (one event per token, each token's readout taken at its
    own position, so one forward more than ``generate``) vs plain ``model.generate`` of the
    same prompt and the same number of tokens (greedy: the very same tokens).
    Goal: stream >= 0.9x the tokens/s of generate.
  - time to first generated token on turn 5 of a conversation vs turn 1 (the page sends
    ``previous_context_length``, so earlier tokens are not streamed again; the conversation's
    key-value cache is reused). Turn 5 without reuse is printed for reference.
    Goal: turn 5 <= 1.5x turn 1.

    HF_HUB_OFFLINE=1 python benchmarks/bench_chat.py [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

TRAITS = 5
QUESTIONS = ["Explain how tides work.", "Why are there two of them each day?",
             "And what does the moon's distance change?", "Does the sun matter as well?",
             "Summarise all of this in one sentence."]


def _experiment(root: Path, d_model: int, n_layers: int):
    from residlab.experiments import load_experiment
    from residlab.traits.vectors import TraitVector, save_vector

    (root / "bench").mkdir(parents=True)
    (root / "bench" / "config.yaml").write_text(
        "model_variants:\n  main:\n    model: default\n    dtype: fp32\n    device: cpu\n")
    experiment = load_experiment("bench", root)
    generator = torch.Generator().manual_seed(0)
    for i in range(TRAITS):
        layer = (i + 1) * n_layers // (TRAITS + 1)
        vector = torch.nn.functional.normalize(torch.randn(d_model, generator=generator), dim=0)
        save_vector(experiment, TraitVector(f"bench/trait{i}", "main", "response[:5]",
                                            "residual", "mean_diff", layer, vector,
                                            {"effect_size": 1.0}))
    return experiment


def _serve(state) -> tuple[str, object, threading.Thread]:
    import uvicorn
    from fastapi import FastAPI

    from residlab.server.chat import chat_router

    app = FastAPI()
    app.include_router(chat_router(state))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}/api/chat", server, thread


def _stream(url: str, body: dict) -> dict:
    """One request: seconds to the first generated token's event and to the end, tokens."""
    start = time.perf_counter()
    first, tokens, done, last = None, [], None, -1
    with httpx.Client(timeout=600) as client, client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            last = event.get("token_index", last)
            if "token_id" in event and not event["is_prompt"]:
                first = first or time.perf_counter() - start
                tokens.append(event["token_id"])
            if event.get("done"):
                done = event
    return {"ttft": first, "total": time.perf_counter() - start, "tokens": tokens,
            "answer": done["full_response"], "cached": done["cached_tokens"], "end": last + 1}


def bench_throughput(loaded, state, url: str, n_tokens: int, repeats: int) -> None:
    from residlab.generation import generate_ids
    from residlab.prompts import template_ids

    messages = [{"role": "user", "content": QUESTIONS[0]}]
    ids = template_ids(loaded.tokenizer, messages)[1]
    stream_s, generate_s = [], []
    for _ in range(repeats):
        state.cache.pop("chat_conversations", None)  # no reuse between repeats
        run = _stream(url, {"messages": messages, "max_tokens": n_tokens})
        stream_s.append(run["total"])
        n = len(run["tokens"])
        start = time.perf_counter()
        (plain,) = generate_ids(loaded.model, loaded.tokenizer, [ids], max_new_tokens=n)
        generate_s.append(time.perf_counter() - start)
        assert plain.token_ids == run["tokens"], "greedy stream and generate differ"
    stream, plain_s = statistics.median(stream_s), statistics.median(generate_s)
    print(f"[throughput] prompt {len(ids)} tokens, {n} generated, {TRAITS} traits read out, "
          f"median of {repeats}")
    print(f"[throughput] model.generate          : {n / plain_s:6.2f} tokens/s")
    print(f"[throughput] /api/chat stream+readout: {n / stream:6.2f} tokens/s")
    print(f"[throughput] stream / generate = {plain_s / stream:.2f}x   (goal >= 0.9x)")


def _conversation(url: str, n_tokens: int) -> list[dict]:
    """Five turns; each request sends the whole conversation so far."""
    messages, runs, seen = [], [], 0
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        run = _stream(url, {"messages": messages, "max_tokens": n_tokens,
                            "previous_context_length": seen})
        runs.append({**run, "messages": list(messages)})
        messages.append({"role": "assistant", "content": run["answer"]})
        seen = run["end"]  # the page shows every token so far
    return runs


def bench_first_token(state, url: str, n_tokens: int, repeats: int) -> None:
    turn1, turn5, cold5, cached = [], [], [], []
    for _ in range(repeats):
        state.cache.pop("chat_conversations", None)
        runs = _conversation(url, n_tokens)
        turn1.append(runs[0]["ttft"])
        turn5.append(runs[4]["ttft"])
        cached.append(runs[4]["cached"])
        state.cache.pop("chat_conversations", None)  # turn 5 again, nothing kept
        cold5.append(_stream(url, {"messages": runs[4]["messages"],
                                   "max_tokens": n_tokens})["ttft"])
    first, fifth, cold = (statistics.median(x) for x in (turn1, turn5, cold5))
    print(f"[first token] turn 1: {first * 1000:7.1f} ms   turn 5: {fifth * 1000:7.1f} ms "
          f"(reused {cached[-1]} cached tokens)   turn 5 without reuse: {cold * 1000:7.1f} ms")
    print(f"[first token] turn 5 / turn 1 = {fifth / first:.2f}x   (goal <= 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="max tokens per answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from residlab.arch import resolve_arch
    from residlab.models import load_model
    from residlab.server.state import ServerState

    loaded = load_model("default", dtype="fp32", device="cpu")
    arch = resolve_arch(loaded.model)
    with tempfile.TemporaryDirectory() as tmp:
        experiment = _experiment(Path(tmp), arch.d_model, arch.n_layers)
        state = ServerState(loaded=loaded, experiment=experiment, variant="main")
        url, server, thread = _serve(state)
        try:
            _stream(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            bench_throughput(loaded, state, url, args.tokens, args.repeats)
            bench_first_token(state, url, args.tokens, args.repeats)
        finally:
            server.should_exit = True
            thread.join(timeout=10)


if __name__ == "__main__":
    main()
