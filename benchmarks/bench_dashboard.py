"""The dashboard's Inference view on a long response: time to chart and payload size.

One run, through ``residlab serve --no-model`` in its own process on a loopback port (as a
user runs it: the page's server does not share an interpreter with the browser driver) and
Debian's Chromium (Playwright):
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
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import torch

CHROMIUM = "/usr/bin/chromium"
# The project's Chromium flags, plus one: headless Chromium otherwise builds its own omnibox
# popup (a WebUI of some 400 modules, over 1 s of CPU) in the background of every new tab,
# which on 2 cores competes with the page being timed and is no part of loading it.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-features=PreloadTopChromeWebUI,WebUIOmniboxPopup"]
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
            start = time.perf_counter()
            page.goto(_url(base))
            page.wait_for_selector('main#view[data-view-ready="inference"]', timeout=30000)
            times.append(time.perf_counter() - start)
            drawn = page.evaluate("() => Object.keys(window.__residlab_debug.inference.series)")
            if len(drawn) != len(TRAITS):
                raise SystemExit(f"the chart shows {drawn}, not the {len(TRAITS)} traits")
            if errors:
                raise SystemExit(f"page errors: {errors}")
            # What the page asked the API for (read after the timing, so that listening to
            # requests does not slow the load being timed).
            asked = page.evaluate("() => performance.getEntriesByType('resource')"
                                  ".map((e) => e.name).filter((u) => u.includes('/api/data/'))")
            page.close()
        browser.close()
    for url in asked:  # the answers of the last load, fetched again to count their bytes
        name = url.split("/api/data/")[1].split("?")[0]
        sizes[name] = sizes.get(name, 0) + len(httpx.get(url).content)
    return times[0], times[1:], sizes


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    """``residlab serve --no-model`` over ``root`` on a free loopback port; its base URL. Its
    log goes to ``root/../serve.log`` (read back if it exits early)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "residlab", "serve", "--no-model", "--experiments-dir",
               str(root), "--host", "127.0.0.1", "--port", str(port)]
    log_path = root.parent / "serve.log"
    log = log_path.open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                log.close()
                raise SystemExit(f"residlab serve exited: {log_path.read_text()[-2000:]}")
            try:
                httpx.get(f"{base}/api/data/experiments", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("residlab serve did not answer within 60 s") from None
                time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "experiments"
        build(root, args.tokens)
        with serve(root) as base:
            cold, warm, sizes = measure(base, args.repeats)
    chart_bytes = sizes.get("projections", 0) + sizes.get("norms", 0)
    raw = (len(TRAITS) + 1) * args.tokens * 4
    median = statistics.median(warm)
    print(f"[dashboard] {args.tokens}-token response, {len(TRAITS)} traits, 'residlab serve' on "
          "127.0.0.1")
    print(f"[time] navigation -> Inference chart drawn: cold {cold * 1000:.0f} ms, warm median "
          f"{median * 1000:.0f} ms of {len(warm)} (min {min(warm) * 1000:.0f}, max "
          f"{max(warm) * 1000:.0f})   (goal < 1000 ms)")
    print(f"[size] API bytes for the chart's numbers (projections + norms) {chart_bytes:,} vs "
          f"raw float32 data {raw:,} = {chart_bytes / raw:.2f}x   (goal <= 1.5x)")
    print(f"[size] all API traffic of the view {sum(sizes.values()):,} bytes: "
          + json.dumps(dict(sorted(sizes.items()))))


if __name__ == "__main__":
    main()
