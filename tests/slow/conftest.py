"""Fixtures of the dashboard's browser tests: a real server on the fixture experiment, and a
Chromium page that fails the test on any page error, console error or dialog, and on any
injected script having run."""

from __future__ import annotations

import pytest

IGNORED_CONSOLE = ("Failed to load resource",)  # 404 / 409 answers the page explains itself


@pytest.fixture(scope="module")
def server(dashboard_root):
    """The dashboard of ``dashboard_root`` (with its noising runs) on a real uvicorn."""
    pytest.importorskip("uvicorn")
    from residlab.server.app import create_app
    from residlab.server.state import ServerState
    from test_server_api import serve_in_thread

    app = create_app(ServerState(), experiments_root=dashboard_root / "experiments",
                     noising_dir=dashboard_root / "noising" / "outputs")
    with serve_in_thread(app) as base:
        yield base


@pytest.fixture
def page():
    from test_viz import CHROMIUM, CHROMIUM_ARGS, _browser

    with _browser() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.errors = []
            page.on("pageerror", lambda error: page.errors.append(str(error)))
            page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" and not
                    m.text.startswith(IGNORED_CONSOLE) else None)
            page.on("dialog", lambda dialog: page.errors.append("dialog: " + dialog.message))
            yield page
            assert page.evaluate("() => [window.__xss, window.__pwned]") == [None, None]
            assert page.errors == []
        finally:
            browser.close()
