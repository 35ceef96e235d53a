"""The static dashboard export: the module bundle, the exported folder, the command.

The bundle is checked against the browser itself: the same modules run as ES modules (served
through Playwright's request routing) and as the bundle (from ``file://``) must leave the same
values behind, and those values are written out by hand here too.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
import yaml
from fastapi.testclient import TestClient
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from residlab.cli import main
from residlab.errors import NotFound, UsageError
from residlab.server.app import create_app
from residlab.server.dashboard.bundle import blank_text, bundle_modules
from residlab.server.dashboard.data import ENDPOINTS, PART1_ENDPOINTS, DashboardData
from residlab.server.dashboard.export import CSP, export_dashboard, static_index_html
from residlab.server.dashboard.files import canonical_key
from residlab.server.state import ServerState

STATIC_DIR = Path(__file__).resolve().parents[1] / "src" / "residlab" / "server" / "static"


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def _page(browser, errors: list[str]):
    page = browser.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return page


# --- the bundle transform -------------------------------------------------------------------

MODULES = {
    "dash_c.js": (
        "window.__evaluated = (window.__evaluated || 0) + 1;\n"
        "export const BASE = 40;\n"
        "export class Counter {\n"
        "  constructor() { this.n = BASE; }\n"
        "  next() { return ++this.n; }\n"
        "}\n"),
    "dash_b.js": (
        'import { BASE } from "./dash_c.js";\n'
        "export function twice(x) { return 2 * x; }\n"
        "export async function later(x) {\n"
        "  await null;\n"
        "  return x + BASE;\n"
        "}\n"
        "export const label = `b:${BASE}`;\n"),
    # Uses an import before its import line (imports are hoisted), imports the same module as
    # dash_b (evaluated once), and holds text that looks like the forbidden forms.
    "dash_app.js": (
        "const early = double(3);\n"
        'import { twice as double, label, later } from "./dash_b.js";\n'
        "import { Counter } from './dash_c.js'; // the class\n"
        'const text = "export let x; import(\\"y\\")";\n'
        "const re = /import\\(\"[{]\"\\)/;\n"
        "/* export default 1;\n   await x; */\n"
        "const tpl = `${label} export default ${ {a: `{`}.a }`;\n"
        "const ratio = 84 / 2 / 1;\n"
        "const counter = new Counter();\n"
        "export const RESULT = {\n"
        '  late: document.getElementById("late").textContent,\n'
        "  evaluated: window.__evaluated, early, label, next: counter.next(), text,\n"
        "  re: re.source, tpl, ratio, self: typeof this,\n"
        "  strict: (function () { return this === undefined; })(),\n"
        "};\n"
        "window.__result = RESULT;\n"
        "later(2).then((value) => { window.__later = value; });\n"),
}
# The page: the module script in <head> runs after the body is parsed (modules are deferred).
PAGE = ('<!doctype html><html><head><meta charset="utf-8">\n'
        '<script type="module" src="/static/dash_app.js"></script>\n'
        '</head><body><p id="late">parsed</p></body></html>\n')
EXPECTED = {"late": "parsed", "evaluated": 1, "early": 6, "label": "b:40", "next": 41,
            "text": 'export let x; import("y")', "re": 'import\\("[{]"\\)',
            "tpl": "b:40 export default {", "ratio": 42, "self": "undefined", "strict": True}


def _settled(page, errors: list[str]) -> list:
    """The module test's two results once its promise resolved (or the errors that stopped
    it, at once rather than after a long timeout)."""
    try:
        page.wait_for_function("window.__later !== undefined", timeout=5000)
    except PlaywrightTimeout:
        pytest.fail(f"the modules did not finish: {errors}")
    result = page.evaluate("[window.__result, window.__later]")
    page.close()
    return result


def _run_bundle(browser, folder: Path) -> tuple[dict, list[str]]:
    """The modules bundled into a page made by the export's own ``index.html`` rewrite."""
    out = folder / "export"
    (out / "static").mkdir(parents=True)
    (out / "data").mkdir()
    (out / "static" / "dashboard.bundle.js").write_text(
        bundle_modules(folder / "static", "dash_app.js"), encoding="utf-8")
    (out / "data" / "index.js").write_text("window.RESIDLAB_STATIC = {index: {}};\n")
    (out / "index.html").write_text(static_index_html(PAGE), encoding="utf-8")
    errors: list[str] = []
    page = _page(browser, errors)
    page.goto((out / "index.html").as_uri())
    return _settled(page, errors), errors


def _run_modules(browser, folder: Path) -> tuple[dict, list[str]]:
    """The modules as the browser runs them (ES modules need http: routed to the folder)."""
    (folder / "index.html").write_text(PAGE)

    def serve(route) -> None:
        path = route.request.url.removeprefix("http://modules.test/")
        kind = "text/javascript" if path.endswith(".js") else "text/html"
        route.fulfill(path=str(folder / path), content_type=kind)

    errors: list[str] = []
    page = _page(browser, errors)
    page.route("http://modules.test/**", serve)
    page.goto("http://modules.test/index.html")
    return _settled(page, errors), errors


def test_bundle_runs_like_the_es_modules(browser, tmp_path):
    folder = tmp_path / "m"
    _write(folder / "static", MODULES)
    bundled, bundle_errors = _run_bundle(browser, folder)
    native, native_errors = _run_modules(browser, folder)
    assert bundle_errors == [] and native_errors == []
    assert native == [EXPECTED, 42]
    assert bundled == native


def test_bundle_puts_imports_before_importers(tmp_path):
    folder = _write(tmp_path, MODULES)
    text = bundle_modules(folder, "dash_app.js")
    order = re.findall(r"^// ---- (\S+) ----$", text, flags=re.M)
    assert order == ["dash_c.js", "dash_b.js", "dash_app.js"]
    app = text.split("// ---- dash_app.js ----")[1]
    assert 'const { twice: double, label, later } = __residlabModules["dash_b.js"];' in app
    assert "return Object.freeze({ RESULT });" in app
    assert not re.search(r"^\s*(import|export)\b", text, flags=re.M)


def test_a_module_left_out_of_the_graph_is_not_bundled(tmp_path):
    folder = _write(tmp_path, {**MODULES, "dash_unused.js": "export const X = 1;\n"})
    assert "dash_unused" not in bundle_modules(folder, "dash_app.js")


@pytest.mark.parametrize(("files", "where", "what"), [
    ({"dash_app.js": 'import { a } from "./dash_b.js";\n',
      "dash_b.js": '\nimport { b } from "./dash_app.js";\nexport const a = 1;\n'},
     "dash_b.js:2", "import cycle dash_app.js -> dash_b.js -> dash_app.js"),
    ({"dash_app.js": '// me\nimport { a } from "./dash_app.js";\nexport const a = 1;\n'},
     "dash_app.js:2", "import cycle dash_app.js -> dash_app.js"),
], ids=["two-modules", "itself"])
def test_an_import_cycle_is_an_error(tmp_path, files, where, what):
    folder = _write(tmp_path, files)
    with pytest.raises(UsageError) as error:
        bundle_modules(folder, "dash_app.js")
    assert str(error.value).startswith(f"{where}: {what}")


FORBIDDEN = {
    "export let": ("export let x = 1;", "'export let' is not allowed"),
    "export var": ("export var x = 1;", "'export var' is not allowed"),
    "default export": ("export default function f() {}", "default exports are not allowed"),
    "export list": ("export { a };", "export lists"),
    "re-export": ('export * from "./dash_b.js";', "re-exports"),
    "export destructuring": ("export const { a } = window;", "export only as"),
    "nested export": ("if (window) {\n  export const a = 1;\n}", "as a top-level statement"),
    "dynamic import": ('function f() { return import("./dash_b.js"); }', "dynamic import()"),
    "import.meta": ("const url = import.meta.url;", "import.meta is not allowed"),
    "top-level await": ('const answer = await fetch("x");', "top-level await"),
    "multi-line import": ('import {\n  a } from "./dash_b.js";', "on one line"),
    "default import": ('import a from "./dash_b.js";', "import only as"),
    "namespace import": ('import * as b from "./dash_b.js";', "import only as"),
    "side-effect import": ('import "./dash_b.js";', "import only as"),
    "bare specifier": ('import { a } from "dash_b.js";', "import only as"),
    "absolute path": ('import { a } from "/static/dash_b.js";', "import only as"),
    "subfolder": ('import { a } from "./lib/dash_b.js";', "import only as"),
    "missing module": ('import { a } from "./dash_none.js";', "no module 'dash_none.js'"),
    "not exported": ('import { nope } from "./dash_b.js";', "dash_b.js does not export 'nope'"),
}


@pytest.mark.parametrize("form", list(FORBIDDEN))
def test_each_forbidden_form_names_its_file_and_line(tmp_path, form):
    code, message = FORBIDDEN[form]
    folder = _write(tmp_path, {
        "dash_app.js": 'import { use } from "./dash_x.js";\nuse();\n',
        "dash_x.js": f"// two harmless lines\nexport function use() {{}}\n{code}\n",
        "dash_b.js": "export const a = 1;\n"})
    with pytest.raises(UsageError) as error:
        bundle_modules(folder, "dash_app.js")
    line = 4 if form == "nested export" else 3
    assert str(error.value).startswith(f"dash_x.js:{line}: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_local_name_imported_twice_is_an_error(tmp_path):
    folder = _write(tmp_path, {
        "dash_app.js": 'import { a } from "./dash_b.js";\nimport { b as a } from "./dash_b.js";\n',
        "dash_b.js": "export const a = 1;\nexport const b = 2;\n"})
    with pytest.raises(UsageError, match=r"^dash_app.js:2: 'a' is imported twice"):
        bundle_modules(folder, "dash_app.js")


def test_a_missing_entry_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="no module 'dash_app.js'"):
        bundle_modules(tmp_path, "dash_app.js")


def test_blanking_keeps_code_and_positions():
    source = 'a = "x{" + `t ${b + {c: "}"}.c} u` / 2; // }\nd = /[/{]/.test(e) ? 1 : 0;\n'
    blanked = blank_text(source)
    assert len(blanked) == len(source) and blanked.count("\n") == source.count("\n")
    assert blanked == ('a = "  " + `  ${b + {c: " "}.c}  ` / 2;     \n'
                       "d = /    /.test(e) ? 1 : 0;\n")


def test_the_real_page_bundles_and_parses(browser):
    """The page's own modules follow the rules, and the bundle is valid JavaScript (parsed by
    the browser without running it)."""
    if not (STATIC_DIR / "dash_app.js").is_file():
        pytest.skip("the dashboard page (static/dash_app.js) is not there yet")
    text = bundle_modules(STATIC_DIR, "dash_app.js")
    names = re.findall(r"^// ---- (\S+) ----$", text, flags=re.M)
    assert names[-1] == "dash_app.js" and len(names) == len(set(names))
    errors: list[str] = []
    page = _page(browser, errors)
    page.goto("about:blank")
    assert page.evaluate("(source) => { new Function(source); return true; }", text)
    page.close()
    assert errors == []


# --- the export of a small experiment written from plain files ------------------------------

@pytest.fixture
def demo(tmp_path) -> Path:
    """The API tests' hand-made experiment, with non-ASCII text in one response."""
    from test_dashboard_api import build

    folder = build(tmp_path / "project")
    path = folder / "inference/tuned/responses/hostile/2.json"
    record = json.loads(path.read_text())
    record["tokens"][-1] = "é😀\u2028"
    record["response"] += "é😀\u2028"
    path.write_text(json.dumps(record))
    return folder


def _index(out: Path) -> dict[str, str]:
    prefix = "window.RESIDLAB_STATIC = "
    text = (out / "data" / "index.js").read_text(encoding="ascii")
    assert text.startswith(prefix) and text.endswith(";\n")
    return json.loads(text[len(prefix):-2])["index"]


def _put(path: Path) -> tuple[str, object]:
    """``window.RESIDLAB_STATIC_PUT(key, payload);`` read back (ASCII only)."""
    prefix = "window.RESIDLAB_STATIC_PUT("
    text = path.read_text(encoding="ascii")
    decoder = json.JSONDecoder()
    assert text.startswith(prefix)
    key, end = decoder.raw_decode(text, len(prefix))
    assert text[end:end + 2] == ", "
    payload, end = decoder.raw_decode(text, end + 2)
    assert text[end:] == ");\n"
    return key, payload


def _expected(root: Path) -> dict[str, object]:
    """Every answer of ``export_keys`` that exists, as JSON, from a fresh data layer."""
    data = DashboardData(root, ["demo"], state=None)
    found = {}
    for endpoint, params in data.export_keys("demo"):
        try:
            payload = data.answer(endpoint, params)
        except NotFound:
            continue
        found[canonical_key(endpoint, params)] = orjson.loads(
            orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY))
    return found


def test_export_holds_every_answer_of_the_page(demo, tmp_path):
    out = tmp_path / "share"
    before = set(tmp_path.iterdir())
    result = export_dashboard(demo.parent, "demo", out)
    assert set(tmp_path.iterdir()) == before | {out}  # nothing written beside it
    expected = _expected(demo.parent)
    index = _index(out)
    assert set(index) == set(expected)
    assert set(PART1_ENDPOINTS) <= {json.loads(key)[0] for key in index} <= set(ENDPOINTS)
    assert len(set(index.values())) == len(index)
    for key, name in index.items():
        assert _put(out / name) == (key, expected[key])
    response = json.loads(canonical_key("response", {"exp": "demo", "variant": "tuned",
                                                     "set": "hostile", "id": "2"}))
    assert expected[json.dumps(response, separators=(",", ":"))]["tokens"][-1] == "é😀\u2028"
    assert result.answers == len(index) and result.requests >= len(index)
    assert result.bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def test_the_exported_page_loads_only_its_own_files(demo, tmp_path):
    out = tmp_path / "share"
    export_dashboard(demo.parent, "demo", out)
    html = (out / "index.html").read_text()
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in html
    assert html.count("Content-Security-Policy") == 1 and "script-src 'self';" in CSP
    assert "/static/" not in html and 'type="module"' not in html
    references = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "static/dashboard.bundle.js" in references and "data/index.js" in references
    for reference in references:
        if not reference.startswith("data:"):
            assert (out / reference).resolve().is_file(), reference
            assert (out / reference).resolve().is_relative_to(out.resolve())
    assert (out / "static" / "vendor" / "uPlot.LICENSE.txt").is_file()
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, flags=re.S)
    assert scripts and all(body.strip() == "" for body in scripts)


def test_the_export_opens_from_file(browser, demo, tmp_path):
    out = tmp_path / "share"
    export_dashboard(demo.parent, "demo", out)
    errors: list[str] = []
    page = _page(browser, errors)
    page.goto((out / "index.html").as_uri() + "?tab=inference&exp=demo&set=hostile&id=1")
    page.wait_for_selector('main#view[data-view-ready="inference"]', state="attached")
    drawn = page.evaluate("window.__residlab_debug.inference")
    assert drawn["x"] == list(range(9)) and len(drawn["series"]) == 2
    assert page.locator("nav a[href='/chat']").is_hidden()
    page.goto((out / "index.html").as_uri() + "?tab=deepdive&exp=demo&set=hostile&id=2")
    page.wait_for_selector('main#view[data-view-ready="deepdive"]', state="attached")
    assert "is not in this export" in page.locator("main#view").inner_text()
    page.close()
    assert errors == []


def test_a_failed_export_leaves_nothing(demo, tmp_path, monkeypatch):
    calls = []

    def broken(self, endpoint, params):
        calls.append(endpoint)
        if len(calls) > 5:
            raise RuntimeError("disk gone")
        return {"ok": True}

    monkeypatch.setattr(DashboardData, "answer", broken)
    before = set(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="disk gone"):
        export_dashboard(demo.parent, "demo", tmp_path / "share")
    assert set(tmp_path.iterdir()) == before and len(calls) == 6


def test_force_replaces_only_a_previous_export(demo, tmp_path):
    out = tmp_path / "share"
    export_dashboard(demo.parent, "demo", out)
    (out / "stale.txt").write_text("from the last export")
    with pytest.raises(UsageError, match="is not empty.*--force"):
        export_dashboard(demo.parent, "demo", out)
    assert (out / "stale.txt").is_file()
    export_dashboard(demo.parent, "demo", out, force=True)
    assert not (out / "stale.txt").exists() and (out / "index.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "share"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not a dashboard export"):
        export_dashboard(demo.parent, "demo", mine, force=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# --- the Noising view in the export ---------------------------------------------------------

VIEWER = "<html><script>draw()</script>\u00e9\u2028</html>\n".encode() + bytes(range(256))


def _noising(root: Path) -> Path:
    """Two runs (the newer one with a viewer), plus a hidden run and a symlinked one that are
    not the folder's runs."""
    out = root / "noising" / "outputs"
    rng = np.random.default_rng(3)
    for run in ("20260101-000000", "20260102-000000"):
        folder = out / run
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"model_name": "m", "seed": 0}))
        records = [{"noise_id": v, "noise_scale": s, "prompt_index": i,
                    "mean_logprob": float(rng.normal(-1 - s)), "total_logprob": float(-v - s)}
                   for v in range(2) for s in (0.0, 4.0) for i in range(3)]
        (folder / "eval_logprobs.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                            for r in records))
    (out / "20260102-000000" / "viz.html").write_bytes(VIEWER)
    shutil.copytree(out / "20260102-000000", out / ".hidden")
    shutil.copytree(out / "20260102-000000", root / "elsewhere")
    (out / "linked").symlink_to(root / "elsewhere", target_is_directory=True)
    return out


def test_export_holds_the_noising_view(demo, tmp_path):
    noising_dir = _noising(tmp_path / "lab")
    out = tmp_path / "share"
    export_dashboard(demo.parent, "demo", out, noising_dir=noising_dir)
    index = _index(out)
    client = TestClient(create_app(ServerState(), experiments_root=demo.parent,
                                   noising_dir=noising_dir), base_url="http://127.0.0.1")
    keys = [("noising_runs", {})] + [("noising_run", {"run": run, "metric": metric})
                                     for run in ("20260101-000000", "20260102-000000")
                                     for metric in ("mean_logprob", "total_logprob")]
    for endpoint, params in keys:  # each exported answer is the server's answer
        key = canonical_key(endpoint, params)
        served = client.get(f"/api/data/{endpoint}", params=params)
        assert served.status_code == 200 and _put(out / index[key]) == (key, served.json())
    listed = _put(out / index[canonical_key("noising_runs", {})])[1]["runs"]
    assert [r["run"] for r in listed] == ["20260102-000000", "20260101-000000"]
    run = _put(out / index[canonical_key("noising_run", {"run": "20260101-000000",
                                                         "metric": "total_logprob"})])[1]
    assert [(q["scale"], q["mean"]) for q in run["quantiles"]] == [(0.0, -0.5), (4.0, -4.5)]
    newest = _put(out / index[canonical_key("noising_run", {"run": "20260102-000000",
                                                            "metric": "mean_logprob"})])[1]
    viewer = out / newest["viz_url"].lstrip("/")  # where the static page links
    assert viewer == out / "noising" / "20260102-000000" / "viz.html"
    assert viewer.read_bytes() == VIEWER
    assert [p for p in (out / "noising").rglob("*") if p.is_file()] == [viewer]


def test_an_export_without_a_noising_folder_says_so(demo, tmp_path):
    out = tmp_path / "share"
    export_dashboard(demo.parent, "demo", out, noising_dir=tmp_path / "absent")
    listing = _put(out / _index(out)[canonical_key("noising_runs", {})])[1]
    assert listing["available"] is False and listing["runs"] == []
    assert not (out / "noising").exists()


# --- the command ----------------------------------------------------------------------------

def _cli(*args: str) -> int:
    return main(["dashboard", "export", *args])


def test_command_writes_the_export(demo, tmp_path, capsys):
    out = tmp_path / "share"
    assert _cli("--experiment", "demo", "--experiments-dir", str(demo.parent), str(out)) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"dashboard export: {out} (") and line.endswith("index.html")
    assert re.search(r"\(\d+ answers, \d+\.\d MB\)", line)
    assert _index(out)


def test_command_exports_the_noising_folder(demo, tmp_path):
    noising_dir = _noising(tmp_path / "lab")
    out = tmp_path / "share"
    assert _cli("--experiment", "demo", "--experiments-dir", str(demo.parent),
                "--noising-dir", str(noising_dir), str(out)) == 0
    assert canonical_key("noising_run", {"run": "20260101-000000",
                                         "metric": "mean_logprob"}) in _index(out)
    assert (out / "noising/20260102-000000/viz.html").read_bytes() == VIEWER


def test_command_takes_the_folder_as_out_too(demo, tmp_path):
    out = tmp_path / "share"
    assert _cli("--experiment", "demo", "--experiments-dir", str(demo.parent),
                "--out", str(out)) == 0
    assert _index(out)


@pytest.mark.parametrize(("args", "message"), [
    (["--experiment", "nope", "OUT"], "experiment 'nope' not found under"),
    (["--experiment", "demo", "FULL"], "is not empty; choose a new output folder, or pass "
                                       "--force"),
    (["--experiment", "demo", "FILE", "--force"], "exists and is not a folder"),
    (["--experiment", "demo", "FULL", "--force"], "is not a dashboard export"),
    (["--experiment", "demo", "OUT", "--out", "OTHER"], "two output folders given"),
], ids=["unknown-experiment", "not-empty", "a-file", "force-on-other-folder", "two-outs"])
def test_bad_input_is_one_line_and_status_2(demo, tmp_path, capsys, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    names = {"OUT": tmp_path / "new", "FULL": tmp_path / "full", "FILE": tmp_path / "file",
             "OTHER": tmp_path / "other"}
    before = sorted(tmp_path.rglob("*"))
    args = [str(names.get(arg, arg)) for arg in args]
    assert _cli(*args, "--experiments-dir", str(demo.parent)) == 2
    err = capsys.readouterr().err
    assert err.startswith("residlab: error: ") and err.count("\n") == 1 and message in err
    assert sorted(tmp_path.rglob("*")) == before
