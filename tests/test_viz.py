"""The viewer: payload, escaping, and a real browser driving the page."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from residlab.cli import main
from residlab.config import NoisingConfig
from residlab.noising.eval import run_eval
from residlab.noising.generate import run_generate
from residlab.noising.viz import build_payload, render_html, run_viz

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
EVIL = [
    "What does <script>window.__pwned = 1</script> do in a comment box?",
    'Explain <img src=x onerror="window.__pwned = 2"> please',
    "Close the tag </script><script>window.__pwned = 3</script> & more",
    "Tell me about tides.", "How do plants drink water?", "What is a prime number?",
]
SCREENSHOT_DIR = Path(__file__).resolve().parents[1] / "test-output"


@pytest.fixture(scope="module")
def viz_run(tmp_path_factory, tiny_llama, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("viz")
    dataset = tmp / "evil.jsonl"
    dataset.write_text("".join(
        json.dumps({"conversation": [{"role": "user", "content": text}]}) + "\n" for text in EVIL))
    cfg = NoisingConfig(model_name=str(tiny_llama_dir), dtype="fp32", device="cpu",
                        dataset_path=str(dataset), num_prompts=6, batch_size=16,
                        max_new_tokens=6, layer_index=1, noise_norms=[0.0, 2.0, 9.0],
                        num_noise_vectors=3, seed=0, output_dir=str(tmp / "out"))
    run_dir = run_generate(cfg, loaded=tiny_llama)
    run_eval(cfg, run_dir, loaded=tiny_llama)
    return run_dir, run_viz(run_dir, top_n=12)


def _payload(html: str) -> dict:
    start = html.index('type="application/json">') + len('type="application/json">')
    return json.loads(html[start:html.index("</script>", start)])


def test_payload_is_inert_and_complete(viz_run):
    _, page = viz_run
    html = page.read_text()
    assert "<script>window.__pwned" not in html and "<img src=x" not in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # nothing fetched
    payload = _payload(html)  # the escaped JSON still decodes to the original text
    prompts = {m["content"] for ex in payload["examples"] for m in ex["messages"]}
    assert set(EVIL[:3]) <= prompts
    assert payload["scales"] == [0.0, 2.0, 9.0]
    for lists in payload["ranking"]:
        for metric, key in (("total", "total_logprob"), ("mean", "mean_logprob")):
            values = [payload["examples"][i][key] for i in lists[metric]]
            assert values == sorted(values) and len(values) <= 12
    assert len(payload["ranking"][0]["total"]) == 6  # zero vector: one card per prompt
    assert [v["noise_id"] for v in payload["vectors"]] != []
    drops = [v["drop"] for v in payload["vectors"]]
    assert drops == sorted(drops, reverse=True)


def test_vector_table_against_numpy(viz_run):
    import numpy as np

    run_dir, page = viz_run
    records = [json.loads(x) for x in (run_dir / "eval_logprobs.jsonl").read_text().splitlines()]
    payload = _payload(page.read_text())
    for row in payload["vectors"]:
        mine = [r["mean_logprob"] for r in records if r["noise_id"] == row["noise_id"]]
        at = {s: np.mean([r["mean_logprob"] for r in records
                          if r["noise_id"] == row["noise_id"] and r["noise_scale"] == s])
              for s in (0.0, 9.0)}
        assert mine and row["drop"] == pytest.approx(at[0.0] - at[9.0])


def test_render_escapes_line_separators():
    html = render_html({"x": "a\u2028b</script>"} | build_payload(
        [], top_n=1, run_name="r", config={}))
    assert "\u2028" not in html and "</script>" in html  # only the template's own closers


def test_viz_bad_input(tmp_path, capsys, viz_run):
    assert main(["noise", "viz", "--run_dir", str(tmp_path)]) == 2
    assert "not a noising run directory" in capsys.readouterr().err
    run_dir, _ = viz_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "eval_logprobs.jsonl").unlink()
    (copy / "viz.html").unlink()
    assert main(["noise", "viz", "--run_dir", str(copy)]) == 2
    assert "residlab noise eval" in capsys.readouterr().err
    assert not (copy / "viz.html").exists()


def _browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: 'make test' installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def test_browser_drives_the_viewer(viz_run):
    _, page_path = viz_run
    with _browser() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("dialog", lambda dialog: errors.append("dialog: " + dialog.message))
            page.goto(page_path.as_uri())
            _check_reader_aids(page, viz_run[0])
            assert page.locator("#chart rect").count() == 3
            assert page.locator("#chart polyline").count() == 3
            assert page.locator("#scale").input_value() == "9"  # largest scale first
            page.select_option("#scale", "0")  # zero vector: one card per prompt
            # The injected markup is shown as text and ran nothing.
            assert page.evaluate("window.__pwned") is None
            texts = page.locator(".msg").all_inner_texts()
            assert any("<script>window.__pwned = 1</script>" in t for t in texts)
            assert page.locator(".card img").count() == 0

            page.select_option("#scale", "9")
            heads = page.locator(".card-head").all_inner_texts()
            assert heads and all("scale 9" in h for h in heads)
            first_page = page.locator(".card").first.inner_text()
            assert page.locator("#page").inner_text().strip().startswith("page 1 of 2")
            page.click("#next")
            assert page.locator("#page").inner_text().strip().startswith("page 2 of 2")
            assert page.locator(".card").first.inner_text() != first_page
            page.click("#prev")

            page.check("#rank-mean")
            means = [float(h.split("mean ")[1].split()[0])
                     for h in page.locator(".card-head").all_inner_texts()]
            assert means == sorted(means)
            assert "Mean per-token" in page.locator("#chart-title").inner_text()

            token = page.locator(".tok").first
            assert "log-prob" in token.get_attribute("title")
            assert "background" in token.get_attribute("style")
            colours = {page.locator(".tok").nth(i).evaluate("e => e.style.background")
                       for i in range(min(20, page.locator(".tok").count()))}
            assert len(colours) > 1  # tokens are coloured by their own values
            assert page.locator("#vectors tr").count() == 1 + 3
            assert errors == []
            SCREENSHOT_DIR.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT_DIR / "viz.png"), full_page=True)
        finally:
            browser.close()


def test_null_scores_are_left_out_of_rankings_and_stats(viz_run):
    """Generations without a score (empty span, not scorable) never rank as the best."""
    import numpy as np

    run_dir, _ = viz_run
    records = [json.loads(x) for x in (run_dir / "eval_logprobs.jsonl").read_text().splitlines()]
    nulls = {"total_logprob": None, "mean_logprob": None, "n_tokens": 0,
             "per_token_logprobs": [], "tokens": []}
    at_nine = [r for r in records if r["noise_scale"] == 9.0]
    at_nine[0].update(nulls)  # an empty response
    at_nine[1].update(nulls, unscored="the reference chat template rewrites this answer")
    for record in [r for r in records if r["noise_scale"] == 2.0]:
        record.update(nulls)  # a scale where nothing has a score
    payload = build_payload(records, top_n=100, run_name="r", config={})
    assert (payload["n_empty"], payload["n_unscored"]) == (len(records) // 3 + 1, 1)
    nine = payload["scales"].index(9.0)
    for metric, key in (("total", "total_logprob"), ("mean", "mean_logprob")):
        ranked = [payload["examples"][i] for i in payload["ranking"][nine][metric]]
        assert len(ranked) == len(at_nine) - 2 and all(ex[key] is not None for ex in ranked)
        assert payload["ranking"][1][metric] == []
        quantiles = payload["chart"][key]["quantiles"]
        assert quantiles[1] is None
        values = [r[key] for r in at_nine if r[key] is not None]
        assert quantiles[nine]["n"] == len(values)
        assert quantiles[nine]["q"][2] == pytest.approx(np.median(values))
    html = render_html(payload)
    assert '"n_unscored": 1' in html


def _records_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "eval_logprobs.jsonl").read_text().splitlines()]


def _tick_x(page) -> dict[float, float]:
    ticks = page.locator("#chart .xtick")
    return {float(ticks.nth(i).get_attribute("data-value")): float(ticks.nth(i).get_attribute("x1"))
            for i in range(ticks.count())}


def _check_reader_aids(page, run_dir: Path) -> None:
    """Axis, legends, header and the unnoised answer, as a researcher reads them."""
    import yaml

    ticks = _tick_x(page)  # norms 0, 2, 9: positions proportional to the values
    assert sorted(ticks) == [0.0, 2.0, 9.0]
    assert (ticks[2.0] - ticks[0.0]) / (ticks[9.0] - ticks[0.0]) == pytest.approx(2 / 9, abs=1e-3)
    assert page.locator("#x-title").text_content() == "noise norm"
    assert page.locator("#y-title").text_content().startswith("total log-prob")
    legend = page.locator("#vector-legend").inner_text()
    assert all(f"{i:04d}" in legend for i in range(3))
    colours = {page.locator(f'#chart polyline[data-noise="{i}"]').get_attribute("stroke")
               for i in range(3)}
    assert len(colours) == 3  # one colour per named vector
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    fields = {page.locator(".field .label").nth(i).inner_text().lower():
              page.locator(".field .value").nth(i).inner_text()
              for i in range(page.locator(".field").count())}
    assert fields["model"] == config["provenance"]["model"]
    assert (fields["layer"], fields["site"], fields["positions"]) == ("1", "resid_pre", "all")
    assert fields["generations"] == str(6 + 6 * 3 * 2)  # norm 0 once per prompt
    assert "42 distinct generations" in page.locator("#count-note").inner_text()
    colour_words = page.locator("#legend").inner_text()
    assert "likely under the reference model" in colour_words and "very unlikely" in colour_words
    # Every noised card shows the norm-0 answer to its prompt, coloured token by token.
    records = _records_of(run_dir)
    cards = page.locator(".card")
    assert cards.count() > 0
    for i in range(cards.count()):
        prompt = int(cards.nth(i).get_attribute("data-prompt"))
        zero = next(r for r in records if r["noise_scale"] == 0 and r["prompt_index"] == prompt)
        tokens = cards.nth(i).locator(".unnoised .tok")
        assert [tokens.nth(j).text_content() for j in range(tokens.count())] == zero["tokens"]
        assert [float(tokens.nth(j).get_attribute("data-logprob"))
                for j in range(tokens.count())] == pytest.approx(zero["per_token_logprobs"])
    page.check("#rank-mean")
    assert page.locator("#y-title").text_content() == "mean log-prob per token"
    page.check("#rank-total")


def test_x_axis_is_numeric_and_symlog_across_decades():
    import numpy as np

    from residlab.noising.viz import x_axis

    linear = x_axis([0.0, 32.0, 128.0])
    assert linear["kind"] == "linear"
    assert linear["positions"] == pytest.approx([0.0, 0.25, 1.0])
    scales = [0.0, 1.0, 10.0, 100.0, 1000.0]
    wide = x_axis(scales)
    oracle = np.log10(1 + np.array(scales))  # symlog with a linear part up to the first norm
    assert wide["kind"] == "symlog"
    assert wide["positions"] == pytest.approx(list(oracle / oracle[-1]))
    assert [t["value"] for t in wide["ticks"]] == scales  # labels at the real values
    assert x_axis([5.0])["positions"] == [0.5]


def test_payload_counts_distinct_generations_and_names_the_model(viz_run):
    run_dir, _ = viz_run
    records = _records_of(run_dir)
    config = {"model_name": "default", "layer_index": 1, "dtype": "bf16", "positions": "prompt",
              "provenance": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, embedded)"}}
    payload = build_payload(records, top_n=5, run_name="r", config=config)
    assert payload["model"] == config["provenance"]["model"]
    assert (payload["dtype"], payload["positions"]) == ("bf16", "prompt")
    assert payload["reference_model"] == records[0]["settings"]["reference"].rsplit("@", 1)[0]
    distinct = {(r["prompt_index"], r["noise_scale"], 0 if r["noise_scale"] == 0 else r["noise_id"])
                for r in records}
    assert payload["n_records"] == len(records) == 54
    assert payload["n_generations"] == len(distinct) == 42
    sampled = build_payload(records, top_n=5, run_name="r", config={"do_sample": True})
    assert sampled["n_generations"] == len(records)  # sampled norm-0 answers differ per vector


def test_payload_has_the_unnoised_answer_for_each_noised_card(viz_run):
    run_dir, _ = viz_run
    records = _records_of(run_dir)
    payload = build_payload(records, top_n=3, run_name="r", config={})
    noised = [ex for ex in payload["examples"] if ex["noise_scale"] != 0]
    assert noised
    for ex in noised:
        base = payload["unnoised"][str(ex["prompt_index"])]
        zero = [r for r in records if r["noise_scale"] == 0
                and r["prompt_index"] == ex["prompt_index"]]
        assert base["noise_scale"] == 0 and base["tokens"] == zero[0]["tokens"]
        assert base["per_token_logprobs"] == zero[0]["per_token_logprobs"]
    no_zero = [r for r in records if r["noise_scale"] != 0]
    assert build_payload(no_zero, top_n=3, run_name="r", config={})["unnoised"] == {}


def _synthetic(scales: list[float], n_vectors: int) -> list[dict]:
    """Records shaped like eval's, with whitespace tokens and a vector that hurts more."""
    out = []
    for noise_id in range(n_vectors):
        for scale in scales:
            mean = -0.1 - scale * (1 + noise_id) / 100
            tokens = ["Hi", " ", "\n", "the", "  ", "re\nx", ""]
            out.append({"noise_id": noise_id, "noise_scale": scale, "prompt_index": 0,
                        "messages": [{"role": "user", "content": "hello"}], "tokens": tokens,
                        "per_token_logprobs": [mean] * len(tokens), "n_tokens": len(tokens),
                        "total_logprob": mean * len(tokens), "mean_logprob": mean,
                        "finish_reason": "length"})
    return out


def test_browser_wide_sweep_many_vectors_and_whitespace(tmp_path):
    scales = [0.0, 1.0, 10.0, 100.0]
    pages = {}
    for name, records in (("wide", _synthetic(scales, 10)),
                          ("no_zero", _synthetic([2.0, 8.0], 2))):
        pages[name] = tmp_path / f"{name}.html"
        pages[name].write_text(render_html(build_payload(records, top_n=5, run_name=name,
                                                         config={})))
    with _browser() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            page.goto(pages["wide"].as_uri())
            ticks = _tick_x(page)
            assert sorted(ticks) == scales
            share = [(ticks[s] - ticks[0.0]) / (ticks[100.0] - ticks[0.0]) for s in scales]
            oracle = [math.log10(1 + s) / math.log10(101) for s in scales]
            assert share == pytest.approx(oracle, abs=1e-3)
            assert "log scale" in page.locator("#x-title").text_content()
            named = page.locator("#vector-legend .vitem[data-noise]")
            assert [int(named.nth(i).get_attribute("data-noise"))
                    for i in range(named.count())] == [9, 8, 7, 6, 5, 4]  # worst first
            assert "4 other vectors" in page.locator("#vector-legend .others").inner_text()
            token = page.locator(".noised .tok").nth(1)  # " ": a dot shown, a space copied
            assert token.text_content() == " "
            assert token.locator(".ws").evaluate(
                "e => getComputedStyle(e, '::before').content") == '"\u00b7"'
            newline = page.locator(".noised .tok").nth(2)
            assert newline.text_content() == "\n"
            assert newline.locator(".ws.nl").count() == 1
            assert page.locator(".noised .tok").nth(3).locator(".ws").count() == 0  # "the"
            assert page.locator(".noised .tok").nth(5).locator(".ws").count() == 1  # "re\nx"
            assert page.locator(".noised").first.locator(".tok.blank").count() == 1
            page.goto(pages["no_zero"].as_uri())
            assert "no norm 0" in page.locator(".card .unnoised").first.inner_text()
        finally:
            browser.close()
