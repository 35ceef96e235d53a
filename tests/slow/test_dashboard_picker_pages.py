"""The prompt picker opens on the page of the prompt a URL names (Chromium, real server).

A set of 60 responses (no model: the JSON files written here) is two pages of 50 ids; a link
to the 58th must show the second page with that id active, and paging back still works.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server_api import serve_in_thread  # noqa: E402

pytestmark = pytest.mark.slow
N_PROMPTS = 60


def _experiment(root: Path) -> Path:
    folder = root / "experiments" / "pages"
    (folder / "inference" / "m" / "responses" / "long").mkdir(parents=True)
    (folder / "config.yaml").write_text(
        "model_variants:\n  m: {model: default, dtype: fp32, device: cpu}\n")
    for i in range(1, N_PROMPTS + 1):
        tokens = ["Hi", f" prompt {i}", " ok", " done"]
        (folder / "inference" / "m" / "responses" / "long" / f"{i}.json").write_text(
            json.dumps({"id": str(i), "prompt": f"Hi prompt {i}", "response": " ok done",
                        "system_prompt": None, "tokens": tokens, "token_ids": [1, 2, 3, 4],
                        "prompt_end": 2, "prompt_note": None, "tags": []}))
    return root / "experiments"


def test_the_picker_opens_on_the_page_of_the_named_prompt(page, tmp_path):
    from residlab.server.app import create_app
    from residlab.server.state import ServerState

    app = create_app(ServerState(), experiments_root=_experiment(tmp_path))
    with serve_in_thread(app) as base:
        page.goto(f"{base}/?tab=inference&exp=pages&variant=m&set=long&id=58&token=3")
        page.wait_for_selector('main#view[data-view-ready="inference"]', timeout=30000)
        page.wait_for_function("() => document.querySelector('#page-info').textContent"
                               ".startsWith('51')")
        assert page.text_content("#page-info") == f"51–60 of {N_PROMPTS}"
        active = page.locator("#id-list .pid.active")
        assert active.count() == 1 and active.get_attribute("data-id") == "58"
        assert page.locator("#token-text .tok.current").text_content() == " done"
        page.click("#page-prev")
        page.wait_for_function("() => document.querySelector('#page-info').textContent"
                               ".startsWith('1–')")
        ids = page.locator("#id-list .pid").evaluate_all("(all) => all.map((b) => b.dataset.id)")
        assert ids[:3] == ["1", "2", "3"] and len(ids) == 50
        assert page.errors == []
