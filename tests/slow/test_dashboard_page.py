"""The dashboard page in Debian's Chromium against a real server on the embedded-model fixture.

The oracle is the files on disk, read here with numpy (not the API): the Inference chart's
cosine series is the projection file's own ``cosine``, diff mode is B's projection minus A's,
the Layer Deep Dive shows the lens file's predictions and the attention file's head average.
Hostile strings (prompt text, notes, a trait folder named with markup) must stay inert.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server_api import serve_in_thread  # noqa: E402
from test_viz import SCREENSHOT_DIR  # noqa: E402

pytestmark = pytest.mark.slow
TRAIT = "emotion/optimism"
EVIL_TRAIT = "hostile/<img src=x onerror=window.__xss=3>"


def _open(page, server: str, view: str, **state: str) -> dict:
    query = "&".join(f"{key}={value}" for key, value in {"tab": view, **state}.items())
    page.goto(f"{server}/?{query}")
    page.wait_for_selector(f'main#view[data-view-ready="{view}"]', timeout=30000)
    return page.evaluate(f"() => window.__residlab_debug.{view}")


def _projection(root: Path, variant: str, folder: str, prompt_id: str) -> dict:
    path = (root / "experiments/demo/inference" / variant / "projections" / TRAIT / folder
            / f"{prompt_id}.json")
    return json.loads(path.read_text())


def _whole(record: dict, key: str) -> np.ndarray:
    return np.array(record[key]["prompt"] + record[key]["response"], dtype=np.float64)


def _default_folder(server: str, variant: str) -> str:
    """The projection folder the page draws by default: the trait's default layer's."""
    import httpx

    index = httpx.get(f"{server}/api/data/experiment", params={"exp": "demo"}).json()
    layer = index["projections"][variant]["hostile"][TRAIT]["default_layer"]
    return f"hostile_L{layer}"


def _wait_token(page, token: int) -> None:
    page.wait_for_function(f"() => window.__residlab_debug.inference.token === {token}")


def test_inference_view_draws_the_files_numbers(page, server, dashboard_root):
    debug = _open(page, server, "inference", exp="demo", variant="base", set="hostile", id="p1",
                  traits=TRAIT, token="0")
    record = _projection(dashboard_root, "base", _default_folder(server, "base"), "p1")
    assert debug["mode"] == "cosine" and debug["diff"] is None
    (name,) = [key for key in debug["series"] if TRAIT in key]
    np.testing.assert_allclose(debug["series"][name], _whole(record, "cosine"), atol=1e-5)
    norms = next(iter(debug["norms"].values()))
    np.testing.assert_allclose(norms, _whole(record, "norms"), rtol=1e-5)
    velocity = next(iter(debug["velocity"].values()))
    np.testing.assert_allclose(velocity[1:], np.diff(_whole(record, "cosine")), atol=1e-5)
    # the token slider and the arrow keys move the marker and the highlighted token
    response = json.loads((dashboard_root / "experiments/demo/inference/tuned/responses/hostile"
                           / "p1.json").read_text())
    page.locator("#token-slider").fill("30")
    _wait_token(page, 30)
    assert page.locator(".tok.current").count() == 1
    assert page.locator(".tok.current").inner_text() == response["tokens"][30]
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("ArrowRight")
    _wait_token(page, 31)
    assert page.locator(".tok.current").inner_text() == response["tokens"][31]
    assert "token=31" in page.url
    # markup in prompts and trait names is text
    assert EVIL_TRAIT.split("/")[1] in page.locator("#trait-list").inner_text()  # by category
    assert "<img src=x onerror=window.__xss=1>" in page.locator("#token-text").inner_text()
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "dashboard_inference.png"), full_page=True)


def test_diff_mode_and_top_spans(page, server, dashboard_root):
    debug = _open(page, server, "inference", exp="demo", variant="tuned", set="hostile", id="p2",
                  traits=TRAIT, token="0", diff="base", mode="raw")
    folder = _default_folder(server, "tuned")
    a = _whole(_projection(dashboard_root, "base", folder, "p2"), "projections")
    b = _whole(_projection(dashboard_root, "tuned", folder, "p2"), "projections")
    n = min(a.size, b.size)
    (name,) = [key for key in debug["series"] if TRAIT in key]
    assert debug["diff"] == "base"
    np.testing.assert_allclose(debug["series"][name], (b - a)[:n], atol=1e-3)
    rows = page.locator("#inf-spans .span-row")
    rows.first.wait_for(timeout=30000)
    assert rows.count() >= 1
    rows.first.click()
    page.wait_for_function("() => document.querySelectorAll('.tok.in-span').length > 0")
    highlighted = page.locator(".tok.in-span").count()
    token = page.evaluate("() => window.__residlab_debug.inference.token")
    assert highlighted >= 1 and token is not None
    page.screenshot(path=str(SCREENSHOT_DIR / "dashboard_diff.png"), full_page=True)


def test_layer_deep_dive_shows_the_lens_and_attention_files(page, server, dashboard_root):
    token = 52
    debug = _open(page, server, "deepdive", exp="demo", variant="tuned", set="hostile", id="p1",
                  token=str(token))
    folder = dashboard_root / "experiments/demo/analysis/per_token/tuned/hostile"
    lens = json.loads((folder / "p1_logit_lens.json").read_text())
    (prediction,) = [p for p in lens["predictions"] if p["token_idx"] == token]
    shown = {str(entry["layer"]): entry for entry in debug["lens"]["by_layer"]}
    for entry in prediction["by_layer"]:
        mine = shown[str(entry["layer"])]
        assert [t[0] for t in mine["top"]] == [t["token"] for t in entry["top_k"][:5]]
        np.testing.assert_allclose([t[1] for t in mine["top"]],
                                   [t["prob"] for t in entry["top_k"][:5]], rtol=1e-6)
        assert mine["actual_rank"] == entry["actual_rank"]
        np.testing.assert_allclose(mine["actual_prob"], entry["actual_prob"], rtol=1e-6)
    weights = load_file(str(folder / "p1_attention.safetensors"))["attention"]  # (L, H, T, T)
    expected = weights[:, :, token, :token + 1].astype(np.float64).mean(axis=1)  # (L, i+1)
    assert debug["colOffset"] == 0  # the attention sink is shown by default
    mean = np.array(debug["mean"], dtype=np.float64).reshape(expected.shape)
    np.testing.assert_allclose(mean, expected, atol=1e-3)
    page.screenshot(path=str(SCREENSHOT_DIR / "dashboard_deepdive.png"), full_page=True)


def test_an_experiment_without_projections_says_what_to_run(page, tmp_path):
    from residlab.server.app import create_app
    from residlab.server.state import ServerState

    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.yaml").write_text("model_variants:\n  m: {model: default}\n")
    with serve_in_thread(create_app(ServerState(), experiments_root=tmp_path)) as base:
        page.goto(f"{base}/?tab=inference&exp=bare")
        page.wait_for_selector('main#view[data-view-ready="inference"]', timeout=30000)
        text = page.locator("main#view").inner_text()
    assert "residlab responses --experiment bare" in text or "residlab capture" in text, text
