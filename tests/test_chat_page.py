"""The Live Chat page in Debian's Chromium, against a scripted stream and against the real server.

The scripted app serves the same static files and a fake ``/api/chat`` whose tokens, scores and
chunking are chosen by the test, so what the page shows can be checked against known values
(event parsing across chunk cuts, smoothing, the chart's values, steering sent, Stop reaching the
server). The last test drives the real app on a tiny Llama with a stored trait vector.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse  # noqa: E402

from test_server_api import serve_in_thread  # noqa: E402
from test_viz import SCREENSHOT_DIR  # noqa: E402

STATIC = Path(__file__).resolve().parents[1] / "src/residlab/server/static"
EVIL = "<img src=x onerror=window.__xss=1>"
TRAITS = [{"trait": "kindness", "layer": 1, "method": "mean_diff", "position": "response[:5]",
           "norm_scale": 3.0},
          {"trait": "formality", "layer": 2, "method": "probe", "position": "response[:5]",
           "norm_scale": 2.0}]
PROMPT_TOKENS = ["<|im_start|>", "user\n", None, "<|im_end|>", "\n", "<|im_start|>",
                 "assistant\n"]  # None: the user's text as one token
WORDS = ["Hé", "llo", " 🌊", " there", ",", " friend", "."]


# ---------------------------------------------------------------- a real server in a thread

# ---------------------------------------------------------------- the scripted app

def score(index: int, trait: int, coefficient: float) -> float:
    """The fake cosine of token ``index`` for trait number ``trait`` (steering shifts it)."""
    return round(0.3 * math.sin(0.7 * index + trait) + 0.1 * coefficient, 6)


def token_event(index: int, text: str, *, prompt: bool, coefficient: float = 0.0) -> dict:
    scores = {t["trait"]: score(index, k, coefficient) for k, t in enumerate(TRAITS)}
    return {"token": text, "token_id": 1000 + index, "token_index": index, "is_prompt": prompt,
            "is_special": text.startswith("<|"), "trait_scores": scores,
            "trait_projections": {name: 10 * v for name, v in scores.items()}}


def scripted_events(body: dict) -> Iterator[tuple[dict, float]]:
    """The events of one request, each with the pause before it (generated tokens are slow)."""
    start = body.get("previous_context_length") or 0
    coefficient = sum(s["coefficient"] for s in body.get("steering", []))
    user = body["messages"][-1]["content"]
    yield {"status": "loading", "vector_metadata": {t["trait"]: {
        "layer": t["layer"], "method": t["method"], "position": t["position"],
        "source": "test"} for t in TRAITS}}, 0.0
    texts = [user if t is None else t for t in PROMPT_TOKENS]
    for i, text in enumerate(texts):
        yield token_event(start + i, text, prompt=True), 0.0
    if user == "break please":
        yield {"error": "generation failed (RuntimeError: out of memory)", "done": True}, 0.0
        return
    reply = []
    for i in range(body["max_tokens"]):
        text = WORDS[i % len(WORDS)]
        reply.append(text)
        yield token_event(start + len(texts) + i, text, prompt=False,
                          coefficient=coefficient), 0.03
    yield {"done": True, "full_response": "".join(reply)}, 0.0


def scripted_app() -> FastAPI:
    """Static files as the real app serves them, plus a scripted /api/chat stream."""
    app = FastAPI()
    app.state.requests = []
    app.state.closed = []  # per request: did the stream end because the client went away?

    @app.get("/chat")
    async def chat_page():
        return FileResponse(STATIC / "chat.html")

    @app.get("/static/{name:path}")
    async def static(name: str):
        path = (STATIC / name).resolve()
        assert path.is_relative_to(STATIC) and path.is_file(), name
        return FileResponse(path)

    @app.get("/api/traits")
    async def traits():
        return JSONResponse(TRAITS)

    @app.post("/api/chat")
    async def chat(request: Request):
        body = await request.json()
        app.state.requests.append(body)
        if body["messages"][-1]["content"] == "fail please":
            return JSONResponse({"error": "unknown trait 'nope'"}, status_code=400)
        return StreamingResponse(_chunks(body, app.state.closed),
                                 media_type="text/event-stream")

    return app


async def _chunks(body: dict, closed: list[bool]):
    """Each event cut in two pieces sent apart, with CRLF line ends (as sse-starlette sends)."""
    finished = False
    try:
        for event, pause in scripted_events(body):
            await asyncio.sleep(pause)
            text = f"data: {json.dumps(event, ensure_ascii=False)}\r\n\r\n".encode()
            cut = len(text) // 2
            yield text[:cut]
            await asyncio.sleep(0.001)
            yield text[cut:]
        finished = True
    finally:
        closed.append(not finished)


@pytest.fixture(scope="module")
def scripted():
    app = scripted_app()
    with serve_in_thread(app) as url:
        yield app, url


def open_page(browser, url: str, path: str = "/chat"):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"pageerror: {error}"))
    page.on("console", lambda m: m.type == "error" and "status of 400" not in m.text
            and problems.append(f"console: {m.text}"))
    page.on("dialog", lambda dialog: problems.append("dialog: " + dialog.message))
    page.on("request", lambda r: r.url.startswith(url) or problems.append(f"offsite: {r.url}"))
    page.goto(url + path)
    page.wait_for_selector(".slider input")
    return page, problems


# ---------------------------------------------------------------- pure functions, in the page

def test_event_parser_survives_any_chunk_cut(browser, scripted):
    """Events split at every byte (inside a UTF-8 character, between CR and LF) parse the same."""
    _, url = scripted
    events = [{"token": "é🌊\n", "i": 0}, {"token": "a\r\nb", "i": 1}, {"done": True}]
    stream = ": keep-alive\r\n\r\n" + "".join(
        f"data: {json.dumps(e, ensure_ascii=False)}{end}{end}"
        for e, end in zip(events, ["\r\n", "\n", "\r"], strict=True))
    stream += "event: x\ndata: [1,\ndata: 2]\n\n"  # two data lines join with a newline
    stream += "data: [3,\r\ndata: 4]\r\n\r\n"  # a cut between CR and LF is no blank line
    expected = [*events, [1, 2], [3, 4]]
    page, problems = open_page(browser, url)
    got = page.evaluate("""async (text) => {
        const { readEvents } = await import('/static/chat_stream.js');
        const bytes = new TextEncoder().encode(text);
        const results = [];
        for (let cut = 1; cut < bytes.length; cut++) {
          const body = new ReadableStream({ start(c) {
            c.enqueue(bytes.slice(0, cut)); c.enqueue(bytes.slice(cut)); c.close(); } });
          const seen = [];
          await readEvents(body, (e) => seen.push(e));
          results.push(seen);
        }
        return results;
    }""", stream)
    assert len(got) == len(stream.encode()) - 1
    assert all(seen == expected for seen in got)
    assert problems == []
    page.close()


def test_smoothing_and_regions(browser, scripted):
    """The smoothed series is numpy's windowed nan-mean; shaded regions are the prompt runs."""
    import itertools

    import numpy as np

    _, url = scripted
    values = [0.5, None, -1.0, 2.0, 3.5, None, None, 0.25, 1.0]
    flags = [True, True, False, False, False, True, False, True, True]
    page, _ = open_page(browser, url)
    got, runs = page.evaluate("""async ([v, flags]) => {
        const chat = await import('/static/chat_chart.js');
        return [chat.smooth(v, 2), chat.regions(flags.map((prompt) => ({ prompt })))];
    }""", [values, flags])
    page.close()
    start, expected_runs = 0, []
    for prompt, group in itertools.groupby(flags):
        n = len(list(group))
        expected_runs.append({"start": start, "end": start + n, "prompt": prompt})
        start += n
    assert runs == expected_runs
    x = np.array([np.nan if v is None else v for v in values])
    for i, v in enumerate(values):
        window = x[max(0, i - 2): i + 3]
        expected = None if v is None else float(np.nanmean(window))
        assert got[i] == pytest.approx(expected)


# ---------------------------------------------------------------- the page against the script

def legend_values(page) -> dict[str, float]:
    """The chart legend's value per trait (what the chart holds at the cursor's token)."""
    rows = page.locator(".u-legend .u-series")
    out = {}
    for i in range(1, rows.count()):
        label = rows.nth(i).locator(".u-label").inner_text()
        out[label] = float(rows.nth(i).locator(".u-value").inner_text().replace("−", "-"))
    return out


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_done(page, timeout: float = 10_000) -> None:
    page.wait_for_function("() => document.querySelector('#send').disabled === false",
                           timeout=timeout)


def test_scripted_chat(browser, scripted):
    app, url = scripted
    page, problems = open_page(browser, url)
    page.evaluate("localStorage.clear()")
    page.reload()
    page.wait_for_selector(".slider input")
    names = page.locator(".slider-name").all_inner_texts()
    assert names == [t["trait"] for t in TRAITS]

    # 1. A message streams: its tokens appear one span each, the chart holds every token.
    page.fill("#max-tokens", "12")
    page.dispatch_event("#max-tokens", "change")
    send(page, EVIL)
    page.wait_for_function("() => +document.querySelector('#chart').dataset.points >= 9")
    early = int(page.get_attribute("#chart", "data-points"))
    wait_done(page)
    n_first = len(PROMPT_TOKENS) + 12
    assert early < n_first == int(page.get_attribute("#chart", "data-points"))
    assert page.locator(".tok").count() == n_first
    assert page.locator("img").count() == 0 and page.evaluate("window.__xss") is None
    assert EVIL in page.locator(".msg.user .msg-body").first.inner_text()
    reply = "".join(WORDS[i % len(WORDS)] for i in range(12))
    assert page.locator(".msg.assistant .msg-body").first.inner_text() == reply
    assert app.state.requests[-1]["previous_context_length"] == 0
    assert app.state.requests[-1]["steering"] == []

    # 2. Hovering a token shows its values, and the chart's legend holds the same numbers.
    index = len(PROMPT_TOKENS) + 3
    page.hover(f'.tok[data-index="{index}"]')
    title = page.get_attribute(f'.tok[data-index="{index}"]', "title")
    assert f"kindness: cos {score(index, 0, 0):.4f}" in title
    assert "kindness" in page.inner_text("#readout")
    chart = legend_values(page)
    assert chart["kindness"] == pytest.approx(score(index, 0, 0), abs=1e-3)
    assert chart["formality"] == pytest.approx(score(index, 1, 0), abs=1e-3)

    # 3. Smoothing: the chart shows the centred 5-token mean.
    page.check("#smooth")
    page.hover(f'.tok[data-index="{index + 1}"]')
    page.hover(f'.tok[data-index="{index}"]')
    mean = sum(score(i, 0, 0) for i in range(index - 2, index + 3)) / 5
    assert legend_values(page)["kindness"] == pytest.approx(mean, abs=1e-3)
    page.uncheck("#smooth")

    # 4. A steering slider changes what the next request sends (and what comes back).
    slider = page.locator('.slider input[data-trait="kindness"]')
    slider.fill("1.5")
    send(page, "again")
    wait_done(page)
    body = app.state.requests[-1]
    assert body["steering"] == [{"trait": "kindness", "coefficient": 1.5}]
    assert body["previous_context_length"] == n_first
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == reply
    n_second = 2 * n_first
    assert int(page.get_attribute("#chart", "data-points")) == n_second
    steered = n_first + len(PROMPT_TOKENS)
    page.hover(f'.tok[data-index="{steered}"]')
    assert legend_values(page)["kindness"] == pytest.approx(score(steered, 0, 1.5), abs=1e-3)
    assert "steering kindness +1.50" in page.locator(".msg.assistant").nth(1).inner_text()

    # 5. Preferences and the conversation survive a reload.
    page.reload()
    page.wait_for_selector(".slider input")
    assert page.locator('.slider input[data-trait="kindness"]').input_value() == "1.5"
    assert page.input_value("#max-tokens") == "12"
    assert page.locator(".tok").count() == n_second
    page.wait_for_function(f"() => +document.querySelector('#chart').dataset.points == {n_second}")

    # 6. Stop mid-stream: the fetch is aborted (the server sees the client leave).
    page.fill("#max-tokens", "2000")
    page.dispatch_event("#max-tokens", "change")
    closed_before = len(app.state.closed)
    send(page, "a long one")
    page.wait_for_function(f"() => +document.querySelector('#chart').dataset.points > "
                           f"{n_second + len(PROMPT_TOKENS) + 3}")
    page.click("#stop")
    wait_done(page)
    deadline = time.monotonic() + 5
    while len(app.state.closed) == closed_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert app.state.closed[closed_before:] == [True]
    assert "stopped" in page.locator(".msg.assistant").last.inner_text()
    assert page.locator(".tok").count() < n_second + len(PROMPT_TOKENS) + 2000

    # 7. Edit the first user message: the conversation is cut there and resent.
    page.fill("#max-tokens", "4")
    page.dispatch_event("#max-tokens", "change")
    page.locator(".msg.user .edit").first.click()
    page.fill(".edit-box", "a new start")
    page.click(".branch")
    wait_done(page)
    body = app.state.requests[-1]
    assert [m["content"] for m in body["messages"]] == ["a new start"]
    assert body["previous_context_length"] == 0
    assert page.locator(".msg").count() == 2
    assert int(page.get_attribute("#chart", "data-points")) == len(PROMPT_TOKENS) + 4

    # 8. Errors are shown as text (a refused request, an error inside the stream); the failed
    # message goes back to the input box and leaves the conversation as it was.
    assert page.get_attribute(".slider-name", "title") == "layer 1 · mean_diff · response[:5]\ntest"
    points = page.get_attribute("#chart", "data-points")
    for text, error in (("fail please", "HTTP 400: unknown trait 'nope'"),
                        ("break please", "generation failed (RuntimeError: out of memory)")):
        send(page, text)
        wait_done(page)
        assert page.inner_text("#error") == error
        assert page.input_value("#input") == text
        assert page.locator(".msg").count() == 2
        page.wait_for_function(f"() => document.querySelector('#chart').dataset.points == {points}")
    page.fill("#input", "")
    send(page, "fine again")
    wait_done(page)
    assert not page.is_visible("#error")
    assert app.state.requests[-1]["previous_context_length"] == int(points)
    assert page.locator(".msg").count() == 4
    page.click("#clear")
    assert page.locator(".msg").count() == 0
    page.wait_for_function("() => document.querySelector('#chart').dataset.points === '0'")
    assert problems == []
    page.close()


def test_vendored_files_match_record():
    """The shipped chart library is the one VENDORED.json names, byte for byte, with its licence."""
    record = json.loads((STATIC / "vendor/VENDORED.json").read_text())
    assert record["name"] == "uplot" and record["license"] == "MIT"
    assert record["integrity"].startswith("sha512-")
    for name, digest in record["files"].items():
        assert hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest() == digest
    assert "MIT License" in (STATIC / "vendor" / record["license_file"]).read_text()
    html = (STATIC / "chat.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing from a CDN


# ---------------------------------------------------------------- the real server

TOKEN = "s3cret-token"
LAYER = 1


@pytest.fixture(scope="module")
def real_server(tmp_path_factory, tiny_llama, tiny_llama_dir):
    """The real app on a tiny Llama experiment with one stored trait vector, behind a token."""
    import torch

    from residlab.experiments import load_experiment
    from residlab.server.app import create_app
    from residlab.server.state import ServerState
    from residlab.traits.vectors import TraitVector, save_vector

    root = tmp_path_factory.mktemp("experiments")
    (root / "tiny").mkdir()
    (root / "tiny/config.yaml").write_text(
        f"model_variants:\n  base:\n    model: {tiny_llama_dir}\n    dtype: fp32\n"
        "    device: cpu\ndefaults:\n  application: base\n  extraction: base\n")
    experiment = load_experiment("tiny", root)
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))  # (D,)
    save_vector(experiment, TraitVector("kindness", "base", "response[:5]", "residual",
                                        "mean_diff", LAYER, vector, {"effect_size": 1.0}))
    state = ServerState(loaded=tiny_llama, experiment=experiment, variant="base", token=TOKEN)
    with serve_in_thread(create_app(state)) as url:
        yield url, tiny_llama, vector / vector.norm()


def greedy_ids(loaded, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding with full forwards (no cache): the oracle for the streamed ids."""
    import torch

    from residlab.generation import stop_token_ids

    stops = set(stop_token_ids(loaded.model, loaded.tokenizer))
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = loaded.model(torch.tensor([ids])).logits[0, -1]  # (V,)
            ids.append(int(logits.argmax()))
            if ids[-1] in stops:
                break
    return ids[len(prompt):]


def cosines(loaded, ids: list[int], unit) -> list[float]:
    """cos(h, v) of resid_post at LAYER for every token, from the model's own hidden states."""
    import torch

    with torch.inference_mode():
        hidden = loaded.model(torch.tensor([ids]), output_hidden_states=True)
        h = hidden.hidden_states[LAYER + 1][0]  # (T, D): the output of block LAYER
    return (h @ unit / h.norm(dim=-1)).tolist()


def page_ids(page, selector: str) -> list[int]:
    return [int(x) for x in page.locator(selector).evaluate_all("s => s.map(e => e.dataset.id)")]


def test_live_chat_on_the_real_server(browser, real_server):
    from residlab.prompts import template_ids

    url, loaded, unit = real_server
    page, problems = open_page(browser, url, "/chat?token=" + TOKEN)  # sets the cookie
    assert "token=" not in page.url
    page.evaluate("localStorage.clear()")
    page.reload()
    page.wait_for_selector(".slider input")
    assert page.locator(".slider-name").all_inner_texts() == ["kindness"]
    sent = []
    page.on("request", lambda r: r.url.endswith("/api/chat") and sent.append(r.post_data_json))

    # A first message streams the greedy tokens; the chart holds the model's own cosines.
    page.fill("#max-tokens", "12")
    page.dispatch_event("#max-tokens", "change")
    send(page, EVIL)
    wait_done(page)
    prompt = template_ids(loaded.tokenizer, [{"role": "user", "content": EVIL}])[1]
    generated = page_ids(page, ".tok.gen")
    assert page_ids(page, ".tok.prompt") == prompt
    assert generated == greedy_ids(loaded, prompt, 12)
    assert page.locator("img").count() == 0 and page.evaluate("window.__xss") is None
    assert EVIL in page.locator(".msg.user .msg-body").first.inner_text()
    expected = cosines(loaded, prompt + generated, unit)
    for index in (2, len(prompt) + 1):  # (a token may be only a newline: no box to hover)
        page.dispatch_event(f'.tok[data-index="{index}"]', "mouseover")
        assert legend_values(page)["kindness"] == pytest.approx(expected[index], abs=2e-3)

    # A steering slider moves the next reply's readouts at the steered layer.
    page.locator('.slider input[data-trait="kindness"]').fill("2")
    send(page, "And now?")
    wait_done(page)
    assert sent[-1]["steering"] == [{"trait": "kindness", "coefficient": 2}]
    assert sent[-1]["previous_context_length"] == len(prompt) + len(generated)
    last = page.locator(".msg.assistant").last
    assert "steering kindness +2.00" in last.inner_text()
    steered = [float(t.split("kindness: cos ")[1].split()[0])
               for t in last.locator(".tok").evaluate_all("s => s.map(e => e.title)")]
    assert steered and min(steered) > 0.5 > max(abs(c) for c in expected)

    # Stop mid-stream: the chart grew frame by frame, and the reply ends where it was stopped.
    page.locator('.slider input[data-trait="kindness"]').fill("0")
    page.fill("#max-tokens", "300")
    page.dispatch_event("#max-tokens", "change")
    page.evaluate("""() => { const c = document.querySelector('#chart'); window.__points = [];
        new MutationObserver(() => window.__points.push(+c.dataset.points))
          .observe(c, { attributes: true, attributeFilter: ['data-points'] }); }""")
    before = int(page.get_attribute("#chart", "data-points"))
    send(page, "Tell me a long story.")
    page.wait_for_function("""(before) => {
        const msgs = document.querySelectorAll('.msg');
        const prompt = msgs[msgs.length - 2].querySelectorAll('.tok').length;
        const reply = msgs[msgs.length - 1].querySelectorAll('.tok').length;
        const points = +document.querySelector('#chart').dataset.points;
        return reply >= 10 && points >= before + prompt + 5;
    }""", arg=before)
    page.click("#stop")
    wait_done(page)
    points = page.evaluate("window.__points")
    assert len(set(points)) >= 2 and points == sorted(points)
    assert points[-1] == page.locator(".tok").count()
    assert "stopped" in page.locator(".msg.assistant").last.inner_text()
    assert page.locator(".msg.assistant").last.locator(".tok").count() < 300
    assert page.inner_text("#error") == ""
    assert problems == []
    page.eval_on_selector("#conversation", "box => { box.scrollTop = 0; }")
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "chat.png"), full_page=True)
    page.close()


def test_fetch_script_checks_integrity_and_takes_only_named_files(tmp_path):
    """A tarball whose sha512 differs from the registry's is refused; extraction copies only the
    named regular files (a link named like a wanted file is refused)."""
    import base64
    import importlib.util
    import io
    import tarfile

    path = Path(__file__).resolve().parents[1] / "scripts/fetch_frontend.py"
    spec = importlib.util.spec_from_file_location("fetch_frontend", path)
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)

    def tarball(link: bool) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name, data in (("package/a.js", b"A"), ("package/extra.js", b"X")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("package/LICENSE")
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                archive.addfile(info)
            else:
                info.size = 3
                archive.addfile(info, io.BytesIO(b"MIT"))
        return buffer.getvalue()

    good = tarball(link=False)
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(good).digest()).decode()
    fetch.check_integrity(good, integrity)
    with pytest.raises(ValueError, match="sha512 mismatch"):
        fetch.check_integrity(good + b"\0", integrity)
    with pytest.raises(ValueError, match="unsupported integrity"):
        fetch.check_integrity(good, "sha1-" + integrity[7:])
    wanted = {"package/a.js": "a.js", "package/LICENSE": "LICENSE.txt"}
    hashes = fetch.extract(good, wanted, tmp_path / "ok")
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["LICENSE.txt", "a.js"]
    assert hashes["a.js"] == hashlib.sha256(b"A").hexdigest()
    with pytest.raises(ValueError, match="not a regular file"):
        fetch.extract(tarball(link=True), wanted, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing written from a bad tarball
