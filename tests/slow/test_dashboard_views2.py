"""The dashboard's part-2 views (Extraction, Steering, Model Analysis, Model Diff spans,
Noising) in Debian's Chromium against a real server on the embedded-model fixture.

Oracles are the files, read here with plain Python: the steering chart's best trait score per
layer at a coherence threshold is recomputed from ``results.jsonl``; the best-vector cell from
the vectors' metadata; the noising box plot from ``eval_logprobs.jsonl``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_viz import SCREENSHOT_DIR  # noqa: E402

pytestmark = pytest.mark.slow
TRAIT = "emotion/optimism"


def _open(page, server: str, view: str, query: str = "exp=demo") -> dict:
    page.goto(f"{server}/?tab={view}&{query}")
    page.wait_for_selector(f'main#view[data-view-ready="{view}"]', timeout=30000)
    return page.evaluate(f"() => window.__residlab_debug.{view}")


def _best_by_layer(rows: list[dict], threshold: float) -> dict[int, tuple[float, float]]:
    """Per layer, (trait, coefficient) of the positive-coefficient run with the highest mean
    trait among runs whose mean coherence is at least ``threshold``."""
    runs: dict[tuple[int, float], list[dict]] = defaultdict(list)
    for row in rows:
        if row["layer"] is not None and row["coefficient"] > 0:
            runs[(row["layer"], row["coefficient"])].append(row)
    best: dict[int, tuple[float, float]] = {}
    for (layer, coefficient), group in sorted(runs.items()):
        trait = statistics.fmean(r["trait_score"] for r in group)
        if statistics.fmean(r["coherence_score"] for r in group) < threshold:
            continue
        if layer not in best or trait > best[layer][0]:
            best[layer] = (trait, coefficient)
    return best


def _set_slider(page, value: int) -> None:
    page.eval_on_selector("#steer-coherence", "(el, v) => { el.value = String(v); "
                          "el.dispatchEvent(new Event('input', {bubbles: true})); }", value)
    page.wait_for_function(f"() => window.__residlab_debug.steering.minCoherence === {value}")
    page.wait_for_selector('main#view[data-view-ready="steering"]', timeout=30000)


def test_steering_slider_and_response_browser(page, server, dashboard_root):
    results = dashboard_root / "experiments/demo/steering" / TRAIT / "base" / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    debug = _open(page, server, "steering")
    assert debug["minCoherence"] == 77
    counted = {}
    for threshold in (0, 30, 100):
        _set_slider(page, threshold)
        debug = page.evaluate("() => window.__residlab_debug.steering")
        (line,) = [line for line in debug["lines"] if line["direction"] == "+"]
        expected = _best_by_layer(rows, threshold)
        assert line["layers"] == sorted(expected)
        for layer, trait, coefficient in zip(line["layers"], line["trait"],
                                             line["coefficient"], strict=True):
            assert trait == pytest.approx(expected[layer][0], abs=1e-4)
            assert coefficient == expected[layer][1]
        counted[threshold] = sum(run["passes"] for run in debug["runs"])
    assert counted[0] > counted[100]  # the slider changes which runs count
    # the response browser sorts and expands
    page.select_option("#steer-resp-sort", "trait")
    page.wait_for_function("() => window.__residlab_debug.steering.responses.sort === 'trait'")
    page.wait_for_selector('main#view[data-view-ready="steering"]', timeout=30000)
    items = page.evaluate("() => window.__residlab_debug.steering.responses.items")
    scores = [item["trait_score"] for item in items]
    assert scores == sorted(scores, reverse=True) and len(scores) == sum(
        r["layer"] is not None for r in rows)
    page.click("#steer-responses tr.resp-row >> nth=0")
    detail = page.locator("#steer-responses tr.resp-detail")
    detail.wait_for(timeout=10000)
    text = detail.inner_text()
    assert items[0]["answer"].strip()[:20] in text and "<script>window.__xss=2</script>" in text
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "dashboard_steering.png"), full_page=True)


def test_extraction_grid_and_best_cell_from_the_vectors(page, server, dashboard_root):
    debug = _open(page, server, "extraction", f"exp=demo&trait={TRAIT}")
    folder = (dashboard_root / "experiments/demo/extraction" / TRAIT / "base" / "vectors"
              / "response__5" / "residual")
    effect = {(method, row["layer"]): row["effect_size"]
              for method in ("mean_diff", "probe")
              for row in json.loads((folder / method / "metadata.json").read_text())["layers"]}
    grid = debug["grids"][0]
    assert sorted(grid["methods"]) == ["mean_diff", "probe"] and grid["layers"] == [12, 18]
    shown = {(m, layer): grid["effect_size"][i][j] for i, m in enumerate(grid["methods"])
             for j, layer in enumerate(grid["layers"])}
    assert shown == pytest.approx(effect)
    best = max(sorted(effect, key=lambda cell: cell[1]), key=lambda cell: effect[cell])
    assert (grid["best"]["method"], grid["best"]["layer"]) == best
    page.screenshot(path=str(SCREENSHOT_DIR / "dashboard_extraction.png"), full_page=True)


def test_analysis_diff_spans_and_noising_render(page, server, dashboard_root):
    debug = _open(page, server, "analysis")
    assert debug["calibration"]["layers"] and debug["diff"]
    debug = _open(page, server, "diffspans")
    assert debug["spans"]
    page.click("#ds-spans a.span-row >> nth=0")
    page.wait_for_selector('main#view[data-view-ready="inference"]', timeout=30000)
    assert "tab=inference" in page.url and "diff=" in page.url
    page.wait_for_function("() => document.querySelectorAll('.tok.in-span').length > 0")
    debug = _open(page, server, "noising", "")
    run_dir = next((dashboard_root / "noising" / "outputs").iterdir())
    scores = [json.loads(line) for line in (run_dir / "eval_logprobs.jsonl").read_text()
              .splitlines() if line.strip()]
    assert debug["quantiles"] and len(debug["drops"]) == 2 and len(scores) == 8
    href = page.get_attribute("#nz-viz", "href")
    assert href and href.endswith("viz.html")
    page.screenshot(path=str(SCREENSHOT_DIR / "dashboard_noising.png"), full_page=True)


def test_the_export_shows_the_part2_views(page, server, dashboard_root, tmp_path):
    """The static export (from file://) draws the Steering, Extraction and Noising views with
    the numbers the served page draws, and ships the noising run's viewer."""
    from residlab.server.dashboard.export import export_dashboard

    out = tmp_path / "share"
    export_dashboard(dashboard_root / "experiments", "demo", out,
                     noising_dir=dashboard_root / "noising" / "outputs")
    for view, query, keys in (("steering", "exp=demo", ("lines", "runs")),
                              ("extraction", f"exp=demo&trait={TRAIT}", ("grids", "best")),
                              ("noising", "exp=demo", ("quantiles", "drops"))):
        served = _open(page, server, view, query)
        page.goto((out / "index.html").as_uri() + f"?tab={view}&{query}")
        page.wait_for_selector(f'main#view[data-view-ready="{view}"]', timeout=30000)
        exported = page.evaluate(f"() => window.__residlab_debug.{view}")
        for key in keys:
            assert exported[key] == served[key], (view, key)
    href = page.get_attribute("#nz-viz", "href")
    run = next((dashboard_root / "noising" / "outputs").iterdir())
    assert (out / "noising" / run.name / "viz.html").read_bytes() == (
        run / "viz.html").read_bytes() and href.endswith(f"noising/{run.name}/viz.html")
    page.screenshot(path=str(SCREENSHOT_DIR / "dashboard_export_noising.png"), full_page=True)
