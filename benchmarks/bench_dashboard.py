"""The dashboard's Inference view on a long response: time to chart and payload size.

One run, through a real uvicorn server on a loopback port and Debian's Chromium (Playwright):
  - time from navigation (``page.goto`` of a URL naming the experiment, prompt and 5 traits)
    to the drawn Inference chart (``main#view[data-view-ready="inference"]``), for a response
    of 2,000 tokens projected onto 5 traits. Cold (first load, empty browser cache) and the
    median of warm repeats (new page each time). Goal: < 1 s.
  - the bytes the API sends for the chart's numbers (the 5 projections and the norms) vs the
    raw float32 data they carry (5 x 2,000 + 2,000 floats x 4 bytes). Goal: <= 1.5x. The
    whole page's API traffic (with the response's text and tokens) is printed too.

The experiment is synthetic (no model runs): random activations projected with residlab's
own projection code onto 5 random unit vectors, written in the projection files' layout.

    python benchmarks/bench_dashboard.py [--tokens 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
TRAITS = [f"bench/trait_{i}" for i in range(5)]
LAYER, WIDTH, PROMPT_TOKENS = 10, 576, 40


def build(root: Path, n_tokens: int) -> None:
    """``root/demo``: one variant, one prompt of ``n_tokens`` tokens, 5 traits projected."""
    from residlab.experiments import load_experiment
    from residlab.inference.project import project_many
    from residlab.store import write_json
    from residlab.traits.vectors import TraitVector, save_vector

    (root / "demo").mkdir(parents=True)
    (root / "demo" / "config.yaml").write_text(
        "model_variants:\n  m: {model: default, dtype: fp32, device: cpu}\n")
    experiment = load_experiment("demo", root)
    rng = np.random.default_rng(0)
    words = [f" w{i % 97}" for i in range(n_tokens)]
    ids = [int(i % 1000) for i in range(n_tokens)]
    variant_dir = experiment.inference_dir("m")
    write_json(variant_dir / "responses" / "long" / "1.json", {
        "id": "1", "prompt": "".join(words[:PROMPT_TOKENS]),
        "response": "".join(words[PROMPT_TOKENS:]), "system_prompt": None, "tokens": words,
        "token_ids": ids, "prompt_end": PROMPT_TOKENS, "prompt_note": None, "tags": []})
    hidden = torch.from_numpy(rng.standard_normal((n_tokens, WIDTH), dtype=np.float32))
    hidden[:, 7] += 80.0  # one massive dimension
    massive = [7, 3, 11, 19, 23, 31, 42, 57]
    calibration = {"layers": {str(layer): {"dims": massive, "values": [80.0] + [1.0] * 7,
                                           "ratio": [40.0] + [1.0] * 7, "mean_norm": 85.0}
                              for layer in range(LAYER - 2, LAYER + 2)}}
    write_json(variant_dir / "massive_activations" / "calibration.json", calibration)
    for trait in TRAITS:
        vector = torch.from_numpy(rng.standard_normal(WIDTH, dtype=np.float32))
        stored = TraitVector(trait, "m", "response[:5]", "residual", "mean_diff", LAYER,
                             vector, {"effect_size": 1.0, "accuracy": 0.9})
        save_vector(experiment, stored)
        unit = vector / vector.norm()
        parts = {"prompt": hidden[:PROMPT_TOKENS], "response": hidden[PROMPT_TOKENS:]}
        results = {part: project_many(h, unit[None, :], [0.0], massive)[0]
                   for part, h in parts.items()}
        source = {"trait": trait, "variant": "m", "layer": LAYER, "method": "mean_diff",
                  "position": "response[:5]", "component": "residual"}
        write_json(variant_dir / "projections" / trait / "long" / "1.json", {
            "metadata": {"prompt_id": "1", "prompt_set": "long", "vector_source": source,
                         "centered": False, "baseline": 0.0, "variant": "m",
                         "settings": {"vector": source, "massive_dims": massive}},
            "projections": {p: r["projections"] for p, r in results.items()},
            "norms": {p: r["norms"] for p, r in results.items()},
            "cosine": {p: r["cosine"] for p, r in results.items()},
            "massive_dims": {"layer": LAYER, "dims": massive,
                             "values": {p: r["massive_values"] for p, r in results.items()}}},
            compact=True)


def _url(base: str) -> str:
    traits = "&".join(f"traits={trait}" for trait in TRAITS)
    return f"{base}/?tab=inference&exp=demo&variant=m&set=long&id=1&token=0&{traits}"


def measure(base: str, repeats: int) -> tuple[float, list[float], dict[str, int]]:
    """Cold seconds, warm seconds, and the API bytes by endpoint of the last warm load."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        times: list[float] = []
        sizes: dict[str, int] = {}
        for _ in range(repeats + 1):
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error, sink=errors: sink.append(str(error)))
            asked: list[str] = []
            page.on("request", lambda request, sink=asked: sink.append(request.url)
                    if "/api/data/" in request.url else None)
            start = time.perf_counter()
            page.goto(_url(base))
            page.wait_for_selector('main#view[data-view-ready="inference"]', timeout=30000)
            times.append(time.perf_counter() - start)
            drawn = page.evaluate("() => Object.keys(window.__residlab_debug.inference.series)")
            if len(drawn) != len(TRAITS):
                raise SystemExit(f"the chart shows {drawn}, not the {len(TRAITS)} traits")
            if errors:
                raise SystemExit(f"page errors: {errors}")
            page.close()
        browser.close()
    for url in asked:  # the answers of the last load, fetched again to count their bytes
        name = url.split("/api/data/")[1].split("?")[0]
        sizes[name] = sizes.get(name, 0) + len(httpx.get(url).content)
    return times[0], times[1:], sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from residlab.server.app import create_app
    from residlab.server.state import ServerState
    from test_server_api import serve_in_thread

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "experiments"
        build(root, args.tokens)
        app = create_app(ServerState(), experiments_root=root)
        with serve_in_thread(app) as base:
            cold, warm, sizes = measure(base, args.repeats)
    chart_bytes = sizes.get("projections", 0) + sizes.get("norms", 0)
    raw = (len(TRAITS) + 1) * args.tokens * 4
    median = statistics.median(warm)
    print(f"[dashboard] {args.tokens}-token response, {len(TRAITS)} traits, served on 127.0.0.1")
    print(f"[time] navigation -> Inference chart drawn: cold {cold * 1000:.0f} ms, warm median "
          f"{median * 1000:.0f} ms of {len(warm)} (min {min(warm) * 1000:.0f}, max "
          f"{max(warm) * 1000:.0f})   (goal < 1000 ms)")
    print(f"[size] API bytes for the chart's numbers (projections + norms) {chart_bytes:,} vs "
          f"raw float32 data {raw:,} = {chart_bytes / raw:.2f}x   (goal <= 1.5x)")
    print(f"[size] all API traffic of the view {sum(sizes.values()):,} bytes: "
          + json.dumps(dict(sorted(sizes.items()))))


if __name__ == "__main__":
    main()
