"""The static export of the fixture experiment, opened from file:// in Chromium, draws the same
Inference chart data as the served dashboard for the same URL state (slow: the fixture is
built on the embedded model)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from residlab.server.app import create_app  # noqa: E402
from residlab.server.dashboard.export import export_dashboard  # noqa: E402
from residlab.server.state import ServerState  # noqa: E402
from test_server_api import serve_in_thread  # noqa: E402
from test_viz import SCREENSHOT_DIR  # noqa: E402

pytestmark = pytest.mark.slow

QUERY = "?tab=inference&exp=demo&variant=tuned&set=hostile&id=p1"
READY = 'main#view[data-view-ready="inference"]'


def _inference(browser, url: str, screenshot: str | None = None) -> dict:
    """The Inference view's drawn series at ``url``, after checking the page ran cleanly."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        page.goto(url)
        page.wait_for_selector(READY, timeout=20000)
        drawn = page.evaluate("JSON.parse(JSON.stringify(window.__residlab_debug.inference))")
        assert page.evaluate("window.__xss") is None  # the fixture's hostile text stayed text
        if screenshot:
            SCREENSHOT_DIR.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT_DIR / screenshot), full_page=True)
        assert errors == []
        return drawn
    finally:
        page.close()


def test_the_export_draws_what_the_server_draws(browser, dashboard_root, tmp_path):
    root = dashboard_root / "experiments"
    out = tmp_path / "export"
    result = export_dashboard(root, "demo", out)
    assert result.answers > 0 and (out / "index.html").is_file()
    app = create_app(ServerState(), experiments_root=root)
    with serve_in_thread(app) as url:
        served = _inference(browser, f"{url}/{QUERY}")
        exported = _inference(browser, (out / "index.html").as_uri() + QUERY,
                              screenshot="dashboard_export.png")
    assert served["series"] and all(len(v) == len(served["x"]) for v in
                                    served["series"].values())
    assert exported == served
